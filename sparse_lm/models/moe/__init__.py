"""The MoE core: routing.py (the router table), dispatch.py and parallel.py
(moving tokens to their experts, on one device and over an expert mesh),
experts.py and grouped.py (the expert FFNs), policy.py (how to compute, per
backend), layer.py (the nnx module gluing them).

Size budget: these files stay under 1,000 code lines (non-blank, non-comment,
non-docstring), with 900 the goal: a new router or dispatch should replace
repetition, not add to it. Every fast path keeps a naive twin in the tests.
"""
