"""The worker: the faust app around the aligner, acks, progress and metrics."""
