"""Capture: cameras, microphones, file replay and transcripts, published to Kafka."""
