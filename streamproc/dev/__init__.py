"""Developer tooling: the local Kafka broker and the demo."""
