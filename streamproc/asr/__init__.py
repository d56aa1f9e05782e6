"""Offline speech recognition: ``PREFIX.audio`` -> transcript segments on ``PREFIX.text``.

- :mod:`streamproc.asr.engine`: the recogniser protocol, the pocketsphinx engine (its wheel
  ships the English model: nothing is downloaded at run time) and loading an engine by
  import path;
- :mod:`streamproc.asr.vad`: voice activity per 30 ms frame (webrtc-style or energy gate);
- :mod:`streamproc.asr.stream`: one stream's utterance cutting, partial and final
  segments on the audio's event-time timeline, deterministic ``sp-seq`` and checkpoints
  (pure: no Kafka, no clock of its own);
- :mod:`streamproc.asr.worker`: the Kafka shell, ``streamproc asr`` (docs/asr.md).
"""
