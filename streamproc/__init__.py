"""streamproc: a streaming multimodal event processor on Kafka.

The data path reads top to bottom through the modules:
sources -> wire -> align -> batch -> models -> inference -> (app: the faust worker) -> consume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from streamproc.config import Settings
    from streamproc.consume import consume

__all__ = ["Settings", "__version__", "consume"]


def __getattr__(name: str) -> Any:
    # lazy, so `import streamproc` stays cheap and free of Kafka/torch imports
    if name == "Settings":
        from streamproc.config import Settings

        return Settings
    if name == "consume":
        from streamproc.consume import consume

        return consume
    raise AttributeError(name)
