"""Datasets, training, evaluation and recording (AV-Digits and your own streams)."""
