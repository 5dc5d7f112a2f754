"""BO-REP (Hao, Gong & Liu, ICLR 2024) against five baselines, small scale.

Run ``python -m paper_repro.borep.run [--quick]``; ``README.md`` in this
folder says what the paper claims and what the reproduction shows.
"""
