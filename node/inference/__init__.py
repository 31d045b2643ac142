"""Inference worker: series to volume, model runners, predictions."""
