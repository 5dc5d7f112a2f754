"""First-order penalty methods (Kwon et al., ICML 2023 and ICLR 2024).

Run ``python -m paper_repro.penalty.run [--quick]``; ``README.md`` in this
folder says what the papers claim and what the reproduction shows.
"""
