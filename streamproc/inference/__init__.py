"""Micro-batched inference and the predictions it publishes."""
