"""Bilevel problem instances with data generators and known solutions.

Every builder returns an :class:`Instance`: the problem, its data, a starting
point and, where they exist, the closed-form (or float64 reference) lower
solution, hypergradient, value function and minimiser.
"""

from problems._base import Instance
from problems.quadratic import quadratic

__all__ = ["Instance", "quadratic"]
