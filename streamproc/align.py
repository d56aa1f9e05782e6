"""Event-time alignment of video, audio and transcripts into windows (design.md section 3).

Pure logic: no Kafka, no asyncio. The faust agent feeds decoded records in and takes
closed windows and late events out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamproc.wire import Source, TranscriptSegment, VideoFrame


@dataclass
class Window:
    """One closed window of one stream: what the model sees, plus how good it is.

    - ``frames``: up to K frames sampled evenly over the window, in time order, still
      encoded (JPEG/PNG); ``frame_count`` is how many frames the window really had.
    - ``audio``: float32 mono at ``sample_rate``, exactly ``round(W * sample_rate)``
      samples, zeros where nothing arrived; ``audio_mask`` is True where a real sample is.
    - ``segments``: every transcript segment that overlaps the window, by start time.
    - ``present``: per modality, whether it contributed anything (the model's mask).
    - ``quality``: frames_dropped (sequence gaps), audio_missing_s, late_events,
      duplicates, closed_by ("watermark", "deadline" or "flush").
    - ``provenance``: per modality, the Kafka source of every input record used.
    """

    stream_id: str
    start_ns: int
    end_ns: int
    frames: list[VideoFrame]
    frame_count: int
    audio: np.ndarray
    audio_mask: np.ndarray
    sample_rate: int
    segments: list[TranscriptSegment]
    present: dict[str, bool]
    quality: dict[str, float | int | str] = field(default_factory=dict)
    provenance: dict[str, list[Source]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.stream_id, self.start_ns)

    @property
    def text(self) -> str:
        """The transcript words of the window, segments joined in time order."""
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())
