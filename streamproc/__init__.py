"""streamproc: a streaming multimodal event processor on Kafka.

The packages follow the data path (docs/design.md §1):

    capture/    cameras, microphones, file replay and transcripts -> the one Kafka producer
    wire/       wire format v1: records <-> Kafka records, door checks of media
    align/      event-time windows per stream (pure: no Kafka, no asyncio)
    worker/     the faust app, a thin shell around the worker core (acks, progress, faults)
    inference/  micro-batched model calls and the predictions they publish
    models/     preprocessing, encoders, fusion, checkpoints, the model registry
    readers.py  reading predictions back (``streamproc consume``)

beside it: ``ml/`` (datasets, training, recording), ``dev/`` (local broker, demo), and
``config``, ``kafka`` (every client), ``topics``, ``errors``, ``cli`` and ``testing``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from streamproc.config import Settings
    from streamproc.readers import consume

__all__ = ["Settings", "__version__", "consume"]


def __getattr__(name: str) -> Any:
    # lazy, so `import streamproc` stays cheap and free of Kafka/torch imports
    if name == "Settings":
        from streamproc.config import Settings

        return Settings
    if name == "consume":
        from streamproc.readers import consume

        return consume
    raise AttributeError(name)
