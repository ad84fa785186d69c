"""Evaluation (docs/design.md §4.7): greedy answers and accuracy, the divergence to the teacher,
and the lm-evaluation-harness / lmms-eval bridges."""
