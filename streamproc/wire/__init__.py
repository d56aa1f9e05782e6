"""The wire format: records <-> Kafka records, and the door checks of media."""
