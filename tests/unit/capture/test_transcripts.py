"""SRT / WebVTT / JSONL parsing: good cues kept, bad lines reported by number and skipped."""

from __future__ import annotations

import json

import pytest
from media_helpers import SRT, SRT_SPANS_NS, SRT_TEXTS

from streamproc.capture.transcripts import (
    LineError,
    load_transcript,
    parse_json_cue,
    parse_jsonl,
    parse_srt,
    parse_vtt,
)
from streamproc.errors import UserError

MS = 1_000_000


def test_srt_cues_spans_and_multiline_text() -> None:
    parsed = parse_srt(SRT)
    assert parsed.issues == []
    assert [(c.start_ns, c.end_ns) for c in parsed.cues] == SRT_SPANS_NS
    assert [c.text for c in parsed.cues] == SRT_TEXTS
    assert [c.line for c in parsed.cues] == [1, 5, 10]


def test_srt_hours_crlf_bom_and_missing_index() -> None:
    text = ("\ufeff1\r\n01:02:03,004 --> 01:02:04,5\r\nhi\r\n\r\n"
            "00:00:10,000 --> 00:00:11,000\r\nno number\r\n")
    parsed = parse_srt(text.encode("utf-8"))
    assert parsed.issues == []
    start = ((1 * 60 + 2) * 60 + 3) * 1_000_000_000 + 4 * MS
    # "04,5" is 4.500 s: a short fraction is padded on the right
    assert (parsed.cues[0].start_ns, parsed.cues[0].end_ns) == (start, start + 1496 * MS)
    assert parsed.cues[1].text == "no number"


def test_srt_bad_lines_are_reported_with_line_numbers_and_skipped() -> None:
    text = (
        "1\n00:00:01,000 --> 00:00:02,000\ngood one\n\n"      # lines 1-3
        "2\n00:00:03,000 -> 00:00:04,000\nbad arrow\n\n"       # line 6: bad timing
        "3\n00:00:05,000 --> 00:00:04,000\nbackwards\n\n"      # line 10: ends before start
        "just some words\n\n"                                  # line 13: no timing at all
        "5\n00:00:07,000 --> 00:00:08,000\n\n"                 # line 16: no text
        "6\n00:00:09,000 --> 00:00:10,000\nlast good\n"        # lines 18-20
    )
    parsed = parse_srt(text, "talk.srt")
    assert [c.text for c in parsed.cues] == ["good one", "last good"]
    assert [(i.line, i.source) for i in parsed.issues] == [
        (6, "talk.srt"), (10, "talk.srt"), (13, "talk.srt"), (16, "talk.srt")]
    assert "bad timing line '00:00:03,000 -> 00:00:04,000'" in str(parsed.issues[0])
    assert str(parsed.issues[0]).startswith("talk.srt:6: ")
    assert "ends before it starts" in parsed.issues[1].message
    assert "just some words" in parsed.issues[2].message
    assert "no text" in parsed.issues[3].message


def test_srt_line_that_is_not_utf8_is_reported_and_the_cue_keeps_its_other_lines() -> None:
    data = b"1\n00:00:01,000 --> 00:00:02,000\nok line\n\xff\xfe broken\n"
    parsed = parse_srt(data, "x.srt")
    assert [c.text for c in parsed.cues] == ["ok line"]
    assert [(i.line, "not UTF-8" in i.message) for i in parsed.issues] == [(4, True)]


def test_vtt_header_ids_notes_tags_and_entities() -> None:
    text = """WEBVTT - a talk

NOTE this block is a comment
with two lines

intro
00:01.000 --> 00:02.500 align:start position:10%
<v Ann>Hello &amp; <b>welcome</b></v>

01:00:00.000 --> 01:00:01.000
hour cue
"""
    parsed = parse_vtt(text)
    assert parsed.issues == []
    assert [(c.start_ns, c.end_ns, c.text) for c in parsed.cues] == [
        (1000 * MS, 2500 * MS, "Hello & welcome"),
        (3600_000 * MS, 3601_000 * MS, "hour cue"),
    ]


def test_vtt_malformed_timing_and_missing_header() -> None:
    text = "00:01.000 --> 00:02.000\nno header\n\n00:03,000 --> 00:04,000\ncomma\n"
    parsed = parse_vtt(text, "a.vtt")
    assert [c.text for c in parsed.cues] == ["no header"]
    assert [i.line for i in parsed.issues] == [1, 4]
    assert "WEBVTT" in parsed.issues[0].message
    assert "expected [HH:]MM:SS.mmm" in parsed.issues[1].message


def test_jsonl_units_optional_fields_and_bad_lines() -> None:
    lines = [
        json.dumps({"text": "a", "start": 0.5, "end": 1.25}),
        json.dumps({"text": "b", "start_ns": 2_000_000_000, "end_ns": 2_500_000_000,
                    "final": False, "confidence": 0.4, "lang": "en"}),
        "{not json",
        json.dumps({"text": "c", "start": 3}),
        json.dumps({"text": "", "start": 1, "end": 2}),
        json.dumps({"text": "d", "start": 2, "end": 1}),
        json.dumps({"text": "e", "start": 1, "end": 2, "confidence": 3}),
        json.dumps(["list"]),
        "",
        json.dumps({"text": "f", "start": 4, "end": 5, "final": "yes"}),
        json.dumps({"text": "g", "start": 6, "end": 7}),
    ]
    parsed = parse_jsonl("\n".join(lines), "s.jsonl")
    assert [(c.text, c.start_ns, c.end_ns, c.final) for c in parsed.cues] == [
        ("a", 500 * MS, 1250 * MS, True),
        ("b", 2_000_000_000, 2_500_000_000, False),
        ("g", 6_000_000_000, 7_000_000_000, True),
    ]
    assert parsed.cues[1].confidence == 0.4 and parsed.cues[1].lang == "en"
    assert [i.line for i in parsed.issues] == [3, 4, 5, 6, 7, 8, 10]
    messages = [i.message for i in parsed.issues]
    assert messages[0].startswith("not JSON")
    assert "both ends" in messages[1]
    assert "empty" in messages[2]
    assert "ends before" in messages[3]
    assert "confidence" in messages[4]
    assert "object" in messages[5]
    assert "final" in messages[6]


def test_jsonl_without_span_is_allowed_for_live_lines_only() -> None:
    assert parse_json_cue('{"text": "now"}').start_ns is None
    parsed = parse_jsonl('{"text": "now"}\n', "f.jsonl")
    assert parsed.cues == [] and "no span" in parsed.issues[0].message
    with pytest.raises(LineError, match="not JSON"):
        parse_json_cue("nope")


def test_load_transcript_sniffs_format_and_reports_unreadable_files(tmp_path) -> None:
    (tmp_path / "a.srt").write_text(SRT)
    (tmp_path / "b.txt").write_text("WEBVTT\n\n00:00.000 --> 00:01.000\nx\n")
    (tmp_path / "c.log").write_text('{"text": "y", "start": 0, "end": 1}\n')
    assert len(load_transcript(tmp_path / "a.srt").cues) == 3
    assert load_transcript(tmp_path / "b.txt").cues[0].text == "x"
    assert load_transcript(tmp_path / "c.log").cues[0].text == "y"
    with pytest.raises(UserError, match="cannot read transcript"):
        load_transcript(tmp_path / "missing.srt")


VTT = ("WEBVTT - made on Windows\n\nNOTE a note\n\n1\n00:00.100 --> 00:00.800 align:start\n"
       "<v Ann>seven</v>\n\nid-2\n00:00:00.900 --> 00:00:01.450\nthree\none\n\n"
       "00:01.500 --> 00:01.900\nfive &amp; more\n")


@pytest.mark.parametrize("name", ["talk.srt", "talk.vtt", "talk.txt", "talk.vtt.bin"])
def test_files_with_a_bom_and_crlf_line_ends_parse_like_plain_ones(tmp_path, name) -> None:
    """What Windows editors and many subtitle tools write: UTF-8 BOM, CRLF everywhere,
    sniffed by content when the extension says nothing."""
    vtt = ".vtt" in name or name.endswith(".txt")
    text = VTT if vtt else SRT
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    parsed = load_transcript(path)
    assert parsed.issues == []
    assert [(c.start_ns, c.end_ns) for c in parsed.cues] == SRT_SPANS_NS
    want = ["seven", "three\none", "five & more"] if vtt else SRT_TEXTS
    assert [c.text for c in parsed.cues] == want
    assert not any("\r" in c.text or "\ufeff" in c.text for c in parsed.cues)


def test_subtitle_files_as_editors_and_players_write_them() -> None:
    """Formatting tags and ASS overrides in SubRip, cues without the blank line between
    them, a WebVTT cue right under its header, and UTF-16 with a byte order mark (what
    Windows editors save as "Unicode")."""
    srt = ("1\n00:00:01,000 --> 00:00:02,000\n<i>Hello</i> {\\an8}<font color=\"red\">there"
           "</font>\n2\n00:00:03,000 --> 00:00:04,000\nWorld\n00:00:05,000 --> 00:00:06,000\n"
           "again\n")
    parsed = parse_srt(srt)
    assert [(c.start_ns // 1_000_000, c.text) for c in parsed.cues] == [
        (1000, "Hello there"), (3000, "World"), (5000, "again")]
    assert parsed.issues == []
    vtt = parse_vtt("WEBVTT\n00:00:01.000 --> 00:00:02.000\nfirst\n\n00:02.500 --> 00:03.000\n"
                    "second &amp; last\n")
    assert [c.text for c in vtt.cues] == ["first", "second & last"] and vtt.issues == []
    utf16 = ("\ufeff1\r\n00:00:01,000 --> 00:00:02,000\r\nçà va\r\n").encode("utf-16-le")
    assert [c.text for c in parse_srt(utf16).cues] == ["çà va"]
    assert [c.text for c in parse_srt(b"\xfe\xff" + "1\n00:00:01,000 --> 00:00:02,000\nok\n"
                                      .encode("utf-16-be")).cues] == ["ok"]
