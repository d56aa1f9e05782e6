"""Event-time alignment of a stream's modalities into windows (pure)."""
