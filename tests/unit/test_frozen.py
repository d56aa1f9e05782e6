"""quick_init gives a frozen, slotted dataclass a faster __init__ that behaves exactly as
the dataclass's own: same parameters and defaults, the same values in every field, still
frozen, equal and hashed the same; classes it cannot copy are refused at import."""

from __future__ import annotations

import dataclasses
import inspect
import weakref

import pytest

from streamproc.frozen import quick_init
from streamproc.wire import codec as wire
from streamproc.worker.core import Consumed


@dataclasses.dataclass(frozen=True, slots=True, weakref_slot=True)
class _Plain:
    a: int
    b: str = "b"
    c: object = None
    d: str = dataclasses.field(default="d", init=False, repr=False, compare=False)


@quick_init
@dataclasses.dataclass(frozen=True, slots=True, weakref_slot=True)
class _Quick:
    a: int
    b: str = "b"
    c: object = None
    d: str = dataclasses.field(default="d", init=False, repr=False, compare=False)


def _fields(obj: object) -> dict[str, object]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "kwargs"), [((1,), {}), ((1, "x"), {}), ((1,), {"c": (2,)}),
                                              ((), {"c": 3, "b": "y", "a": 4})])
def test_quick_init_sets_what_the_dataclass_init_sets(args, kwargs) -> None:
    plain, quick = _Plain(*args, **kwargs), _Quick(*args, **kwargs)
    assert _fields(quick) == _fields(plain)
    assert repr(quick).replace("_Quick", "_Plain") == repr(plain)
    assert quick == _Quick(*args, **kwargs) and hash(quick) == hash(_Quick(*args, **kwargs))
    assert quick != _Quick(99)
    assert dataclasses.replace(quick, a=7) == _Quick(7, quick.b, quick.c)
    assert weakref.ref(quick)() is quick
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.a = 2  # type: ignore[misc]


def test_quick_init_takes_the_same_parameters() -> None:
    sig = [(p.name, p.kind, p.default) for p in inspect.signature(_Quick).parameters.values()]
    assert sig == [(p.name, p.kind, p.default)
                   for p in inspect.signature(_Plain).parameters.values()]
    with pytest.raises(TypeError):
        _Quick()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Quick(1, "b", None, "d")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Quick(1, e=2)  # type: ignore[call-arg]


def test_the_wire_records_still_build_and_compare_as_dataclasses() -> None:
    src = wire.Source("t", 1, 2)
    frame = wire.VideoFrame("cam", 5, 1, b"\xff\xd8", source=src)
    assert (frame.stream_id, frame.ts_ns, frame.seq, frame.fmt, frame.width, frame.source,
            frame.modality) == ("cam", 5, 1, "jpeg", 0, src, "video")
    assert frame == wire.VideoFrame("cam", 5, 1, b"\xff\xd8")  # source is not compared
    rec = wire.KafkaRecord(b"k", b"v")
    assert (rec.headers, rec.timestamp_ms, rec.topic, rec.partition, rec.offset) == \
        ((), None, "", -1, -1)
    chunk = wire.AudioChunk("cam", 0, 0, b"\x00\x00" * 160)
    assert (chunk.fmt, chunk.sample_rate, chunk.channels, chunk.modality, chunk.n_samples) == \
        ("s16le", 16000, 1, "audio", 160)
    seg = wire.TranscriptSegment("cam", 0, "hi", 0, 10)
    assert (seg.final, seg.words, seg.modality) == (True, None, "text")
    assert Consumed("t", 0, 3, rec, None).record is rec
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.seq = 2  # type: ignore[misc]


def test_classes_it_cannot_copy_are_refused() -> None:
    with pytest.raises(TypeError, match="frozen, slotted"):
        @quick_init
        @dataclasses.dataclass(slots=True)
        class _Mutable:
            a: int

    with pytest.raises(TypeError, match="frozen, slotted"):
        @quick_init
        @dataclasses.dataclass(frozen=True, slots=True)
        class _Post:
            a: int

            def __post_init__(self) -> None:
                pass

    with pytest.raises(TypeError, match="default factory"):
        @quick_init
        @dataclasses.dataclass(frozen=True, slots=True)
        class _Factory:
            a: list = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="plain fields"):
        @quick_init
        @dataclasses.dataclass(frozen=True, slots=True)
        class _Init:
            a: int
            b: dataclasses.InitVar[int] = 0

    with pytest.raises(TypeError, match="plain fields"):
        @quick_init
        @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
        class _KwOnly:
            a: int

    with pytest.raises(TypeError, match="needs a default"):
        @quick_init
        @dataclasses.dataclass(frozen=True, slots=True)
        class _Unset:
            a: int
            b: int = dataclasses.field(init=False)
