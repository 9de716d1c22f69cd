"""Inference: the two-stage predictor, post-processing, the infer command and its outputs."""
