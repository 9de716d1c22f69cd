"""Evaluation: NumPy metrics, per-patient scoring, and the evaluation report."""
