"""The conformance bank: small bilevel problems written from the math."""
