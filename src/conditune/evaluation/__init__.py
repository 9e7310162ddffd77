"""Evaluation: word error rate and related metrics."""
