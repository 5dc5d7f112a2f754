"""Reproductions of the papers behind the solvers, one sub-package per paper.

Each reproduction is small and honest: it states what the paper claims, what
runs here (CPU, offline data) and where the two disagree.
"""
