"""Heads: attention interventions attached to a model for the span of one ``generate()`` call.

Each is a context manager built on :func:`veridical.attention.intercept_attention`.
"""
