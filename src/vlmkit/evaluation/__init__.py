"""Evaluation: tasks, metrics and the batched prediction runner."""
