"""Wire format v1: every record type round-trips, and bad input only ever raises WireError."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamproc.wire import codec as wire
from streamproc.wire.codec import (
    AudioChunk,
    KafkaRecord,
    Prediction,
    TranscriptSegment,
    VideoFrame,
    WireError,
    Word,
)

SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

stream_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp", "Co", "Cn")),
    min_size=1, max_size=40,
).filter(lambda s: s == s.strip() and s.isprintable() and len(s.encode()) <= 255)
times = st.integers(min_value=0, max_value=4_000_000_000_000_000_000)
seqs = st.integers(min_value=0, max_value=2**40)


@st.composite
def images(draw) -> np.ndarray:
    h = draw(st.integers(1, 48))
    w = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**32 - 1))
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return img


@st.composite
def video_frames(draw) -> VideoFrame:
    fmt = draw(st.sampled_from(["jpeg", "png"]))
    return VideoFrame.from_image(draw(stream_ids), draw(times), draw(seqs), draw(images()),
                                 fmt=fmt, quality=draw(st.integers(30, 100)))


@st.composite
def audio_chunks(draw) -> AudioChunk:
    ch = draw(st.integers(1, 4))
    n = draw(st.integers(1, 800))
    fmt = draw(st.sampled_from(["s16le", "f32le"]))
    seed = draw(st.integers(0, 2**32 - 1))
    samples = np.random.default_rng(seed).uniform(-1, 1, (n, ch)).astype(np.float32)
    return AudioChunk.from_samples(draw(stream_ids), draw(times), draw(seqs), samples,
                                   draw(st.sampled_from([8000, 16000, 22050, 44100, 48000])), fmt)


@st.composite
def words_in(draw, start: int, end: int) -> tuple[Word, ...] | None:
    """None, or word timings inside ``[start, end)``, starts and ends in order (a
    zero-length word is a point before the end, unless the segment itself is a point)."""
    if draw(st.booleans()):
        return None
    spans = []
    for _ in range(draw(st.integers(0, 6))):
        ws = draw(st.integers(start, end))
        we = draw(st.integers(ws, end))
        if ws == we == end and start < end:
            ws = we = start
        spans.append((ws, we))
    # the i-th smallest end is never before the i-th smallest start
    starts, ends = sorted(s for s, _ in spans), sorted(e for _, e in spans)
    return tuple(Word(draw(st.text(max_size=12)), s, e) for s, e in zip(starts, ends,
                                                                         strict=True))


@st.composite
def segments(draw) -> TranscriptSegment:
    start = draw(times)
    end = start + draw(st.integers(0, 10_000_000_000))
    return TranscriptSegment(
        draw(stream_ids), draw(seqs), draw(st.text(max_size=80)), start, end,
        draw(st.booleans()),
        draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        draw(st.one_of(st.none(), st.sampled_from(["en", "de", "pt-BR"]))),
        words=draw(words_in(start, end)),
    )


records = st.one_of(video_frames(), audio_chunks(), segments())


# --- round trips ------------------------------------------------------------------------


@SETTINGS
@given(records)
def test_media_records_round_trip(rec) -> None:
    kr = wire.encode(rec)
    assert kr.key == rec.stream_id.encode()
    assert kr.timestamp_ms == rec.ts_ns // 1_000_000
    assert dict(kr.headers)["sp-v"] == b"1"
    back = wire.decode(kr, expect_modality=rec.modality)
    assert back == rec
    assert type(back) is type(rec)


@SETTINGS
@given(audio_chunks())
def test_audio_samples_survive_and_span_is_exact(chunk: AudioChunk) -> None:
    back = wire.decode(wire.encode(chunk))
    assert np.array_equal(back.samples(), chunk.samples())
    assert back.end_ns - back.ts_ns == back.n_samples * 1_000_000_000 // back.sample_rate


def test_jpeg_frame_decodes_close_to_source_and_png_exactly() -> None:
    yy, xx = np.mgrid[0:120, 0:160]
    img = np.stack([xx * 1.5, yy * 2.0, (xx + yy)], axis=-1).astype(np.uint8)
    jpeg = wire.decode(wire.encode(VideoFrame.from_image("cam", 1, 0, img, quality=95)))
    assert (jpeg.width, jpeg.height) == (160, 120)
    assert np.abs(jpeg.image().astype(int) - img).mean() < 3.0
    png = wire.decode(wire.encode(VideoFrame.from_image("cam", 1, 0, img, fmt="png")))
    assert np.array_equal(png.image(), img)


@SETTINGS
@given(st.builds(
    Prediction,
    stream_id=stream_ids, window_start_ns=times, window_end_ns=times,
    label=st.text(max_size=20),
    scores=st.dictionaries(st.text(max_size=8), st.floats(0, 1), max_size=5),
    modalities=st.fixed_dictionaries({"video": st.fixed_dictionaries({"frames": st.integers(0, 30)}),
                                      "missing": st.lists(st.sampled_from(["audio", "text"]))}),
    model=st.fixed_dictionaries({"name": st.text(max_size=10), "version": st.text(max_size=5)}),
    emitted_at_ns=times,
    latency_ms=st.dictionaries(st.sampled_from(["queue", "inference"]), st.floats(0, 1e4)),
    rev=st.integers(0, 2**40), final=st.booleans(), reused=st.booleans(),
))
def test_predictions_round_trip(p: Prediction) -> None:
    kr = wire.encode_prediction(p)
    assert kr.key == p.stream_id.encode()
    assert kr.header("sp-rev") == str(p.rev).encode()
    back = wire.decode_prediction(kr)
    assert back == p
    assert back.revision_key == (p.stream_id, p.window_start_ns, p.rev)
    assert back.key == (p.stream_id, p.window_start_ns)


def _prediction_json(**changes: object) -> dict:
    obj = wire.Prediction("cam", 0, 10, "7", {"7": 1.0}, {"missing": []},
                          {"name": "m", "version": "1"}, 5).to_json()
    obj.update(changes)
    return obj


def _prediction_record(obj: dict) -> KafkaRecord:
    return KafkaRecord(b"cam", json.dumps(obj).encode())


def test_prediction_revision_fields_are_on_the_wire() -> None:
    p = wire.Prediction("cam", 0, 10, "7", {"7": 1.0}, {}, {}, 5, rev=1, final=True,
                        reused=True)
    kr = wire.encode_prediction(p)
    obj = json.loads(kr.value or b"")
    assert (obj["rev"], obj["final"], obj["reused"]) == (1, True, True)
    assert dict(kr.headers)["sp-rev"] == b"1" and dict(kr.headers)["sp-ts"] == b"0"
    provisional = wire.Prediction("cam", 0, 10, "3", {"3": 0.6}, {}, {}, 4, final=False)
    assert wire.decode_prediction(wire.encode_prediction(provisional)).final is False


def test_predictions_written_before_revisions_decode_as_final_rev_0() -> None:
    obj = _prediction_json()
    for name in ("rev", "final", "reused"):
        del obj[name]
    p = wire.decode_prediction(_prediction_record(obj))  # no sp-rev header either
    assert (p.rev, p.final, p.reused) == (0, True, False)
    assert p.revision_key == ("cam", 0, 0)


@pytest.mark.parametrize(("changes", "message"), [
    ({"rev": -1}, r"'rev' must be a non-negative int, got -1"),
    ({"rev": True}, r"'rev' must be a non-negative int, got True"),
    ({"rev": 1.0}, r"'rev' must be a non-negative int, got 1\.0"),
    ({"rev": "1"}, r"'rev' must be a non-negative int, got '1'"),
    ({"rev": None}, r"'rev' must be a non-negative int, got None"),
    ({"rev": 2**63}, r"'rev' must be a non-negative int"),
    ({"final": 1}, r"'final' must be true or false, got 1"),
    ({"final": "yes"}, r"'final' must be true or false, got 'yes'"),
    ({"reused": None}, r"'reused' must be true or false, got None"),
])
def test_bad_prediction_revision_fields_are_wire_errors(changes: dict, message: str) -> None:
    with pytest.raises(WireError, match=message):
        wire.decode_prediction(_prediction_record(_prediction_json(**changes)))


@SETTINGS
@given(records, st.text(min_size=1, max_size=200),
       st.sampled_from(wire.DeadLetterKind), st.integers(0, 99), st.integers(0, 2**40))
def test_dead_letters_keep_the_original_record(rec, reason, kind, partition, offset) -> None:
    kr = wire.encode(rec)
    consumed = KafkaRecord(kr.key, kr.value, kr.headers, kr.timestamp_ms, "sp.video",
                           partition, offset)
    dl = wire.decode_dead_letter(wire.make_dead_letter(consumed, reason, kind))
    assert (dl.reason, dl.kind) == (reason, kind)
    assert dl.source == wire.Source("sp.video", partition, offset)
    assert (dl.original.key, dl.original.value, dl.original.headers) == (kr.key, kr.value,
                                                                        kr.headers)


# --- bad input ----------------------------------------------------------------------------


def _mutate(kr: KafkaRecord, data: st.DataObject) -> KafkaRecord:
    """One random damage of the kind real producers and networks cause."""
    how = data.draw(st.sampled_from(
        ["truncate", "flip", "drop_header", "garble_header", "dup_header", "relabel", "key",
         "append"]))
    value, headers, key = kr.value, list(kr.headers), kr.key
    if how == "truncate":
        value = value[: data.draw(st.integers(0, max(0, len(value) - 1)))]
    elif how == "flip":
        buf = bytearray(value)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] ^= data.draw(st.integers(1, 255))
        value = bytes(buf)
    elif how == "drop_header":
        del headers[data.draw(st.integers(0, len(headers) - 1))]
    elif how == "garble_header":
        i = data.draw(st.integers(0, len(headers) - 1))
        headers[i] = (headers[i][0], data.draw(st.binary(max_size=12)))
    elif how == "dup_header":
        headers.append(headers[data.draw(st.integers(0, len(headers) - 1))])
    elif how == "relabel":
        i = [k for k, _ in headers].index("sp-mod")
        headers[i] = ("sp-mod", data.draw(st.sampled_from([b"video", b"audio", b"text", b"x"])))
    elif how == "key":
        key = data.draw(st.one_of(st.none(), st.binary(max_size=300)))
    else:
        value = value + data.draw(st.binary(min_size=1, max_size=7))
    return KafkaRecord(key, value, tuple(headers), kr.timestamp_ms)


@SETTINGS
@given(records, st.data())
def test_damaged_records_raise_only_wire_error(rec, data) -> None:
    bad = _mutate(wire.encode(rec), data)
    try:
        out = wire.decode(bad)
    except WireError as e:
        assert str(e)  # a reason a person can read
        return
    # some damage still leaves a valid record (e.g. a flipped bit inside JPEG data);
    # then it must at least be a complete, typed record of the stated modality
    assert out.modality == dict(bad.headers)["sp-mod"].decode()


@SETTINGS
@given(st.one_of(video_frames(), segments()), st.data())
def test_truncated_media_and_text_always_fail(rec, data) -> None:
    kr = wire.encode(rec)
    cut = data.draw(st.integers(0, len(kr.value) - 1))
    with pytest.raises(WireError):
        wire.decode(KafkaRecord(kr.key, kr.value[:cut], kr.headers, kr.timestamp_ms))


def _audio() -> KafkaRecord:
    return wire.encode(AudioChunk.from_samples("mic", 1000, 3, np.zeros((160, 2)), 16000))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda kr: kr.value[:-1], "not a multiple of 4 bytes"),
        (lambda kr: b"", "empty value"),
    ],
)
def test_odd_pcm_lengths(change, expected) -> None:
    kr = _audio()
    with pytest.raises(WireError, match=expected):
        wire.decode(KafkaRecord(kr.key, change(kr), kr.headers, kr.timestamp_ms))


def _with_header(kr: KafkaRecord, name: str, value: bytes | None) -> KafkaRecord:
    headers = tuple((k, v) for k, v in kr.headers if k != name)
    if value is not None:
        headers += ((name, value),)
    return KafkaRecord(kr.key, kr.value, headers, kr.timestamp_ms)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("sp-v", b"2", "unknown wire format version sp-v='2'"),
        ("sp-v", None, "missing header sp-v"),
        ("sp-mod", b"smell", "sp-mod must be one of video, audio, text"),
        ("sp-ts", b"-5", "sp-ts must be a non-negative ASCII decimal"),
        ("sp-ts", b"12a", "sp-ts must be a non-negative ASCII decimal"),
        ("sp-seq", None, "missing header sp-seq"),
        ("sp-fmt", b"u8", "audio sp-fmt must be s16le or f32le"),
        ("sp-sr", b"0", "sp-sr=0 is out of range"),
        ("sp-ch", b"\xff", "sp-ch is not ASCII"),
        # next to what is looked up as bytes first: each is read again to say why
        ("sp-v", b"01", "unknown wire format version sp-v='01'"),
        ("sp-mod", b"AUDIO", "sp-mod must be one of video, audio, text, got 'AUDIO'"),
        ("sp-mod", b"\xc3\xa9", "sp-mod is not ASCII"),
        ("sp-fmt", b"S16LE", "audio sp-fmt must be s16le or f32le, got 'S16LE'"),
        ("sp-seq", b"007", "sp-seq must be a non-negative ASCII decimal, got '007'"),
        ("sp-seq", b"1_000", "sp-seq must be a non-negative ASCII decimal"),
        ("sp-seq", b" 5", "sp-seq must be a non-negative ASCII decimal"),
        ("sp-seq", b"", "sp-seq must be a non-negative ASCII decimal, got ''"),
        ("sp-ts", "\u0662".encode(), "sp-ts is not ASCII"),  # a digit, but not an ASCII one
        ("sp-sr", b"999999", "sp-sr=999999 is out of range"),
        ("sp-ch", b"0", "sp-ch=0 is out of range"),
    ],
)
def test_bad_headers_name_the_header(name, value, message) -> None:
    with pytest.raises(WireError, match=message.replace("(", r"\(")) as err:
        wire.decode(_with_header(_audio(), name, value))
    assert err.value.header == name


def test_non_utf8_transcript_and_bad_json() -> None:
    kr = wire.encode(TranscriptSegment("s", 0, "hi", 5, 9))
    with pytest.raises(WireError, match="not UTF-8"):
        wire.decode(KafkaRecord(kr.key, b"\xff\xfe{}", kr.headers, 0))
    bad = json.dumps({"text": "hi", "start_ns": 9, "end_ns": 5}).encode()
    with pytest.raises(WireError, match="not a valid time span"):
        wire.decode(KafkaRecord(kr.key, bad, kr.headers, 0))
    shifted = _with_header(kr, "sp-ts", b"6")
    with pytest.raises(WireError, match="differs from the segment's start_ns"):
        wire.decode(shifted)


def _text_record(obj: dict) -> KafkaRecord:
    kr = wire.encode(TranscriptSegment("s", 0, "x", obj["start_ns"], obj["end_ns"]))
    return KafkaRecord(kr.key, json.dumps(obj).encode(), kr.headers, 0)


def test_word_timings_round_trip_and_are_written_only_when_present() -> None:
    seg = TranscriptSegment("s", 0, "seven three", 5, 90,
                            words=(Word("seven", 5, 40), Word("three", 50, 90)))
    kr = wire.encode(seg)
    assert json.loads(kr.value)["words"] == [{"text": "seven", "start_ns": 5, "end_ns": 40},
                                             {"text": "three", "start_ns": 50, "end_ns": 90}]
    assert wire.decode(kr) == seg
    plain = TranscriptSegment("s", 0, "seven", 5, 90)
    assert "words" not in json.loads(wire.encode(plain).value)
    assert wire.decode(wire.encode(plain)).words is None
    # an older producer's record, and an explicit null, decode without words
    obj = {"text": "hi", "start_ns": 5, "end_ns": 9, "final": True}
    assert wire.decode(_text_record(obj)).words is None
    assert wire.decode(_text_record({**obj, "words": None})).words is None
    # extra per-word fields (a recogniser's probabilities) are ignored, like extra fields
    extra = {**obj, "words": [{"text": "hi", "start_ns": 5, "end_ns": 9, "p": 0.9}]}
    assert wire.decode(_text_record(extra)).words == (Word("hi", 5, 9),)
    # zero-length words: anywhere before the end; at the point of a zero-length segment
    points = {**obj, "words": [{"text": "a", "start_ns": 5, "end_ns": 5},
                               {"text": "b", "start_ns": 8, "end_ns": 8}]}
    assert len(wire.decode(_text_record(points)).words or ()) == 2
    point = {"text": "a", "start_ns": 7, "end_ns": 7,
             "words": [{"text": "a", "start_ns": 7, "end_ns": 7}]}
    assert wire.decode(_text_record(point)).words == (Word("a", 7, 7),)


def _word(text: object = "w", start: object = 5, end: object = 6) -> dict:
    return {"text": text, "start_ns": start, "end_ns": end}


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("seven", "field 'words' must be a list"),
        ({"text": "seven"}, "field 'words' must be a list"),
        (["seven"], r"words\[0\] must be an object"),
        ([_word(), 3], r"words\[1\] must be an object"),
        ([{"start_ns": 5, "end_ns": 6}], r"words\[0\] lacks field 'text'"),
        ([{"text": "w", "end_ns": 6}], r"words\[0\] lacks field 'start_ns'"),
        ([{"text": "w", "start_ns": 5}], r"words\[0\] lacks field 'end_ns'"),
        ([_word(text=7)], r"words\[0\] field 'text' must be a string"),
        ([_word(text=None)], r"words\[0\] field 'text' must be a string"),
        ([_word(start="5")], r"words\[0\] field 'start_ns' must be an integer"),
        ([_word(start=5.0)], r"words\[0\] field 'start_ns' must be an integer"),
        ([_word(end=True)], r"words\[0\] field 'end_ns' must be an integer"),
        ([_word(start=7, end=6)], r"words\[0\] span \[7, 6\) ends before it starts"),
        ([_word(start=4, end=6)], "lies outside its segment's span"),
        ([_word(start=8, end=10)], "lies outside its segment's span"),
        ([_word(start=9, end=9)], "lies outside its segment's span"),  # the end is not in
        ([_word(start=-1, end=-1)], "lies outside its segment's span"),
        ([_word("b", 7, 8), _word("a", 5, 6)],
         r"not in time order: words\[1\] starts at 5, before words\[0\] at 7"),
        ([_word("long", 5, 9), _word("in", 6, 7)],
         r"not in time order: words\[1\] ends at 7, before words\[0\] at 9"),
        ([_word()] * (wire.MAX_WORDS + 1), f"has {wire.MAX_WORDS + 1} words; at most "),
    ],
)
def test_bad_word_timings_are_wire_errors_that_name_the_problem(words, message) -> None:
    obj = {"text": "w", "start_ns": 5, "end_ns": 9, "final": True, "words": words}
    with pytest.raises(WireError, match=message) as err:
        wire.decode(_text_record(obj))
    assert err.value.kind == "decode"


def test_as_many_words_as_allowed_decode() -> None:
    obj = {"text": "w", "start_ns": 0, "end_ns": wire.MAX_WORDS,
           "words": [_word("w", i, i + 1) for i in range(wire.MAX_WORDS)]}
    assert len(wire.decode(_text_record(obj)).words or ()) == wire.MAX_WORDS


def test_video_dimension_mismatch_and_oversize() -> None:
    kr = wire.encode(VideoFrame.from_image("cam", 1, 0, np.zeros((10, 20, 3), np.uint8)))
    with pytest.raises(WireError, match="image is 20x10 but headers sp-w/sp-h say 21x10"):
        wire.decode(_with_header(kr, "sp-w", b"21"))
    with pytest.raises(WireError, match="over the 100-byte limit") as err:
        wire.decode(kr, max_bytes=100)
    assert err.value.kind == "oversize"
    with pytest.raises(WireError, match="record on the audio topic"):
        wire.decode(kr, expect_modality="audio")


def test_missing_or_bad_key() -> None:
    kr = wire.encode(TranscriptSegment("s", 0, "hi", 5, 9))
    for key, msg in [(None, "no key"), (b"\xff", "not UTF-8"), (b" s", "surrounding space")]:
        with pytest.raises(WireError, match=msg):
            wire.decode(KafkaRecord(key, kr.value, kr.headers, 0))



# --- hostile sizes and rates ---------------------------------------------------------------


@pytest.mark.parametrize(("rate", "ok"), [(1, False), (7999, False), (8000, True),
                                          (192_000, True), (192_001, False)])
def test_sample_rates_outside_a_sane_range_are_refused(rate: int, ok: bool) -> None:
    kr = _with_header(_audio(), "sp-sr", str(rate).encode())
    if ok:
        assert wire.decode(kr).sample_rate == rate
    else:
        with pytest.raises(WireError, match=f"sp-sr={rate} is out of range"):
            wire.decode(kr)


def _png_bomb(side: int) -> bytes:
    """A valid grey PNG of side x side zero pixels: small on the wire, huge decoded."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (len(body).to_bytes(4, "big") + kind + body
                + zlib.crc32(kind + body).to_bytes(4, "big"))

    rows = zlib.compressobj(9)
    zeros = bytes(side + 1)  # filter byte + one row
    idat = b"".join(rows.compress(zeros) for _ in range(side)) + rows.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def test_frames_over_the_pixel_cap_are_refused_from_their_headers() -> None:
    side = 8192  # 67 Mpx: 64 MiB of grey pixels in a 65 KB PNG
    png = _png_bomb(side)
    kr = wire.encode(VideoFrame("cam", 1, 0, png, "png", side, side))
    with pytest.raises(WireError, match=r"8192x8192 = 67\.1 Mpx, over the limit of 8\.8 Mpx") \
            as err:
        wire.decode(kr, max_pixels=4096 * 2160)
    assert err.value.kind == "oversize" and err.value.header == "sp-w"
    # the cap comes before anything reads the image: a value that is no image at all
    junk = KafkaRecord(kr.key, b"\xff\xd8 not a jpeg", _with_header(
        _with_header(kr, "sp-fmt", b"jpeg"), "sp-w", b"16384").headers, 0)
    with pytest.raises(WireError, match="over the limit") as err:
        wire.decode(junk, max_pixels=4096 * 2160)
    assert err.value.kind == "oversize"


def test_a_png_is_checked_without_decoding_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    def no_decoding(*args, **kwargs):
        raise AssertionError("the door decoded an image")

    img = np.random.default_rng(1).integers(0, 256, (24, 32, 3), np.uint8)
    kr = wire.encode(VideoFrame.from_image("cam", 1, 0, img, "png"))
    bomb = wire.encode(VideoFrame("cam", 1, 0, _png_bomb(8192), "png", 8192, 8192))
    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    assert wire.decode(kr).width == 32
    assert wire.decode(bomb).width == 8192  # without a cap it passes, still undecoded


def _pngs() -> list[bytes]:
    """PNGs as OpenCV and PIL write them: grey, BGR, BGRA, 16-bit, palette, interlaced."""
    import io

    import cv2
    from PIL import Image

    rng = np.random.default_rng(7)
    bgr = rng.integers(0, 256, (12, 17, 3), np.uint8)
    out = [cv2.imencode(".png", bgr)[1].tobytes(),
           cv2.imencode(".png", bgr[:, :, 0])[1].tobytes(),
           cv2.imencode(".png", np.dstack([bgr, bgr[:, :, :1]]))[1].tobytes(),
           cv2.imencode(".png", bgr.astype(np.uint16) * 257)[1].tobytes()]
    for mode, kw in [("P", {}), ("RGB", {"interlace": 1}), ("1", {}), ("LA", {})]:
        buf = io.BytesIO()
        Image.fromarray(bgr).convert(mode).save(buf, "PNG", **kw)
        out.append(buf.getvalue())
    return out


def test_every_intact_png_passes_with_its_size() -> None:
    for data in _pngs():
        assert wire.png_size(data) == (17, 12)


def test_a_damaged_png_opencv_cannot_decode_is_refused() -> None:
    import cv2

    rng = np.random.default_rng(3)
    refused = 0
    for data in _pngs():
        for _ in range(150):
            bad = bytearray(data)
            how = rng.integers(3)
            at = int(rng.integers(8, len(bad)))
            if how == 0:
                bad[at] ^= 1 << int(rng.integers(8))
            elif how == 1:
                bad = bad[:at]
            else:
                bad[at:at] = rng.integers(0, 256, int(rng.integers(1, 9)), np.uint8).tobytes()
            bad = bytes(bad)
            try:
                size = wire.png_size(bad)
            except WireError:
                refused += 1
                continue
            img = cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_UNCHANGED)
            assert img is not None and (img.shape[1], img.shape[0]) == size, bad
    assert refused > 500  # most damage is caught; what passes decodes


def test_dead_letter_kinds_are_their_header_values() -> None:
    assert [str(k) for k in wire.DeadLetterKind] == [
        "decode", "late", "oversize", "capacity", "clock", "internal", "partition"]
    consumed = KafkaRecord(b"cam", b"x", (), 0, "sp.video", 0, 7)
    for kind in wire.DeadLetterKind:
        dl = wire.make_dead_letter(consumed, "why", kind)
        assert dict(dl.headers)["sp-error-kind"] == kind.value.encode("ascii")
        assert wire.decode_dead_letter(dl).kind == kind
    assert WireError("bad").kind is wire.DeadLetterKind.DECODE
    with pytest.raises(ValueError, match="dead-letter kind must be one of"):
        wire.make_dead_letter(consumed, "why", "exploded")


@pytest.mark.parametrize("headers, expected", [
    # the clients' own shape is kept as it is
    ([("sp-v", b"1"), ("sp-mod", b"video")], (("sp-v", b"1"), ("sp-mod", b"video"))),
    ((("sp-v", b"1"),), (("sp-v", b"1"),)),
    ([], ()),
    (None, ()),
    # anything else is made into (str, bytes) pairs
    ([(b"sp-v", b"1")], (("sp-v", b"1"),)),
    ([["sp-v", b"1"]], (("sp-v", b"1"),)),
    ([("sp-v", None)], (("sp-v", b""),)),
    ([("sp-v", bytearray(b"1"))], (("sp-v", b"1"),)),
    ([("sp-v", b"1"), ("sp-mod", memoryview(b"video"))], (("sp-v", b"1"), ("sp-mod", b"video"))),
    ({"sp-v": b"1"}, (("sp-v", b"1"),)),
    ([(b"\xff\xfe", b"1")], (("\ufffd\ufffd", b"1"),)),
])
def test_normalize_headers_gives_str_bytes_pairs(headers, expected) -> None:
    out = wire.normalize_headers(headers)
    assert out == expected
    assert type(out) is tuple
    assert all(type(kv) is tuple and type(kv[0]) is str and type(kv[1]) is bytes for kv in out)


def test_a_stream_id_is_checked_once_per_key_and_a_bad_one_every_time() -> None:
    assert wire.stream_id_of(b"cam-\xc3\xa9") == "cam-\u00e9"
    assert wire.stream_id_of(b"cam-\xc3\xa9") == "cam-\u00e9"
    assert wire.stream_id_of(bytearray(b"cam-7")) == "cam-7"  # not bytes: checked, not kept
    for _ in range(2):
        with pytest.raises(WireError, match="surrounding space"):
            wire.stream_id_of(b" cam")
        with pytest.raises(WireError, match="not UTF-8"):
            wire.stream_id_of(b"\xff")
