"""Word-timed transcripts: a window gets exactly the words that overlap it.

The oracle decides overlap from the definition (docs/alignment.md): a word [s, e) is in
the window [k, k + W) iff s < k + W and e > k; a zero-length word is the point s, in the
window iff k <= s < k + W. It checks every candidate window and never calls the aligner's
helpers.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamproc.align.aligner import Aligner, Window
from streamproc.testing import MS, T0, align_config, segment
from streamproc.wire import codec as wire
from streamproc.wire.codec import Source, TranscriptSegment, Word

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GRID = 5 * MS  # times on a coarse grid, so words often start or end on window edges


def run(cfg, segs: list[TranscriptSegment]) -> dict[int, Window]:
    """Every segment added (text is the only expected modality), then flushed."""
    a = Aligner(cfg)
    for s in segs:
        assert a.add(s, 0).status == "accepted"
    wins = a.flush()
    assert len({w.start_ns for w in wins}) == len(wins)
    return {w.start_ns: w for w in wins}


def overlaps(s: int, e: int, k: int, w: int) -> bool:
    if e == s:
        return k <= s < k + w
    return s < k + w and e > k


def texts(win: Window) -> list[tuple[int, str]]:
    return [(s.seq, s.text) for s in win.segments]


# --- examples ------------------------------------------------------------------------------


def test_words_are_cut_at_window_edges_like_audio() -> None:
    cfg = align_config(1000, expected=("text",))
    seg = segment("s", 0, 100 * MS, 2900 * MS, words=[
        ("one", 100 * MS, 600 * MS),
        ("two", 800 * MS, 1000 * MS),  # ends exactly on the edge: not in the next window
        ("three", 900 * MS, 1200 * MS),  # crosses the edge: in both
        ("four", 1000 * MS, 1000 * MS),  # a point on the edge: the window it starts
        ("five", 2000 * MS, 2100 * MS),  # starts on the edge
    ])
    wins = run(cfg, [seg])
    assert sorted(wins) == [0, 1000 * MS, 2000 * MS]
    got = {k: w.segments for k, w in wins.items()}
    assert [s.text for s in got[0]] == ["one two three"]
    assert [s.text for s in got[1000 * MS]] == ["three four"]
    assert [s.text for s in got[2000 * MS]] == ["five"]
    assert [(s.start_ns, s.end_ns) for k in sorted(got) for s in got[k]] == [
        (100 * MS, 1000 * MS), (1000 * MS, 2000 * MS), (2000 * MS, 2900 * MS)]
    assert got[1000 * MS][0].words == (Word("three", 900 * MS, 1200 * MS),
                                        Word("four", 1000 * MS, 1000 * MS))
    assert wins[2000 * MS].text == "five"
    # the clipped copies keep who the segment is and where it came from
    assert all(s.seq == 0 and s.final for k in got for s in got[k])


def test_hopping_windows_give_a_word_to_every_window_it_overlaps() -> None:
    cfg = align_config(1000, 500, expected=("text",))
    seg = segment("s", 0, 0, 1500 * MS, words=[("a", 0, 400 * MS), ("b", 450 * MS, 700 * MS),
                                              ("c", 1000 * MS, 1500 * MS)])
    wins = run(cfg, [seg])
    assert {k // MS: w.text for k, w in wins.items()} == {
        -500: "a b", 0: "a b", 500: "b c", 1000: "c"}


def test_segments_without_words_stay_whole_beside_word_timed_ones() -> None:
    cfg = align_config(1000, expected=("text",))
    plain = segment("s", 0, 500 * MS, 1500 * MS, "said whole", Source("t", 0, 0))
    timed = segment("s", 1, 600 * MS, 1400 * MS, source=Source("t", 0, 1), words=[("x", 600 * MS, 700 * MS),
                                                         ("y", 1300 * MS, 1400 * MS)])
    wins = run(cfg, [plain, timed])
    assert texts(wins[0]) == [(0, "said whole"), (1, "x")]
    assert texts(wins[1000 * MS]) == [(0, "said whole"), (1, "y")]
    assert wins[0].segments[0] is plain and wins[1000 * MS].segments[0] is plain
    # the window's provenance and presence are the records', as before
    assert wins[0].present["text"]
    assert wins[0].provenance["text"] == [Source("t", 0, 0), Source("t", 0, 1)]


def test_a_segment_whose_words_miss_the_window_is_kept_with_no_text() -> None:
    cfg = align_config(1000, expected=("text",))
    seg = segment("s", 0, 0, 2500 * MS, words=[("before", 0, 500 * MS),
                                               ("after", 2100 * MS, 2500 * MS)])
    wins = run(cfg, [seg])
    mid = wins[1000 * MS]
    assert [(s.text, s.words, s.start_ns, s.end_ns) for s in mid.segments] == [
        ("", (), 1000 * MS, 2000 * MS)]
    assert mid.text == "" and mid.present["text"]


def test_an_empty_word_list_is_no_word_timings() -> None:
    cfg = align_config(1000, expected=("text",))
    seg = segment("s", 0, 500 * MS, 1500 * MS, "kept whole", words=[])
    wins = run(cfg, [seg])
    assert [w.segments for w in wins.values()] == [[seg], [seg]]


def test_blank_words_add_no_spaces() -> None:
    cfg = align_config(1000, expected=("text",))
    seg = segment("s", 0, 0, 900 * MS, "uh seven", words=[
        ("uh", 0, 100 * MS), (" ", 100 * MS, 200 * MS), (" seven ", 200 * MS, 300 * MS)])
    (win,) = run(cfg, [seg]).values()
    assert win.segments[0].text == "uh seven" and len(win.segments[0].words or ()) == 3


def test_final_segments_still_replace_the_partials_they_revise_when_clipped() -> None:
    cfg = align_config(1000, expected=("text",))
    partial = TranscriptSegment("s", 0, "sev and thr", 0, 1500 * MS, final=False, words=(
        Word("sev", 0, 400 * MS), Word("and", 900 * MS, 1100 * MS),
        Word("thr", 1200 * MS, 1500 * MS)))
    final = TranscriptSegment("s", 1, "seven and", 0, 1100 * MS, words=(
        Word("seven", 0, 500 * MS), Word("and", 900 * MS, 1100 * MS)))
    wins = run(cfg, [partial, final])
    assert wins[0].text == "seven and"
    # window 1 s: the final (clipped to 1.0-1.1 s) overlaps the clipped partial and
    # replaces it; before clipping the partial's whole text would have stood there
    assert wins[1000 * MS].text == "and"
    later = TranscriptSegment("s", 1, "seven", 0, 800 * MS, words=(Word("seven", 0, 500 * MS),))
    wins = run(cfg, [partial, later])
    assert wins[0].text == "seven"
    assert wins[1000 * MS].text == "and thr"  # only the partial's words of this window
    # a final whose words miss a window still revises the partials there: it says nothing
    # was said
    quiet = TranscriptSegment("s", 1, "seven", 0, 1600 * MS, words=(Word("seven", 0, 500 * MS),))
    assert run(cfg, [partial, quiet])[1000 * MS].text == ""


# --- the oracle ----------------------------------------------------------------------------


@st.composite
def cases(draw) -> tuple:
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    window_ms = draw(st.sampled_from([50, 100, 200, 250, 300, 500]))
    if draw(st.booleans()):
        hop_ms = window_ms
    else:
        hop_ms = 5 * draw(st.integers(max(1, window_ms // 20), window_ms // 5))
    start = T0 + draw(st.integers(0, 400)) * GRID
    # a timeline of words (starts and ends in order, some zero-length, some overlapping),
    # split into segments at random; some segments have no words at all
    words: list[Word] = []
    t = last_end = start
    for i in range(draw(st.integers(0, 30))):
        t += rnd.randint(0, 12) * GRID
        last_end = max(last_end, t + rnd.choice([0, 0, 0, 1, 2, 5, 20, 60]) * GRID)
        words.append(Word(f"w{i}", t, last_end))
    groups: list[list[Word]] = []
    for w in words:
        if not groups or rnd.random() < 0.25:
            groups.append([])
        groups[-1].append(w)
    segs: list[TranscriptSegment] = []
    for g in groups:
        s0 = g[0].start_ns - rnd.choice([0, 0, 1, 7]) * GRID
        e0 = max(w.end_ns for w in g)
        if any(w.start_ns == w.end_ns == e0 for w in g) and s0 < e0:
            e0 += GRID  # a point word must lie before its segment's end
        e0 += rnd.choice([0, 0, 1, 7]) * GRID
        segs.append(segment("s", len(segs), s0, e0, words=g))
    for _ in range(draw(st.integers(0, 3))):
        s0 = start + rnd.randint(0, 300) * GRID
        segs.append(segment("s", len(segs), s0, s0 + rnd.randint(0, 60) * GRID))
    rnd.shuffle(segs)
    return window_ms, hop_ms, segs


@SETTINGS
@given(cases())
def test_every_word_lands_in_exactly_the_windows_it_overlaps(case) -> None:
    window_ms, hop_ms, segs = case
    cfg = align_config(window_ms, hop_ms, expected=("text",))
    w, h = cfg.window_ns, cfg.hop_ns
    segs = [wire.decode(wire.encode(s)) for s in segs]  # they are valid wire records
    wins = run(cfg, segs)
    by_seq = {s.seq: s for s in segs}

    for k, win in wins.items():
        assert [s.seq for s in win.segments] == [
            s.seq for s in sorted(segs, key=lambda s: (s.start_ns, s.seq))
            if overlaps(s.start_ns, s.end_ns, k, w)], "segment membership changed"
        for got in win.segments:
            orig = by_seq[got.seq]
            if not orig.words:
                assert got is orig
                continue
            want = tuple(x for x in orig.words if overlaps(x.start_ns, x.end_ns, k, w))
            assert got.words == want
            assert got.text == " ".join(x.text for x in want)
            assert k <= got.start_ns <= got.end_ns <= k + w
            assert (got.start_ns, got.end_ns) == (max(orig.start_ns, k),
                                                  min(orig.end_ns, k + w))
            assert (got.seq, got.final, got.stream_id) == (orig.seq, orig.final, orig.stream_id)

    # each word: the windows holding it are exactly those it overlaps (checked over every
    # candidate window start); tumbling, one plus the edges strictly inside it
    for orig in segs:
        for word in orig.words or ():
            got_in = {k for k, win in wins.items() for s in win.segments
                      if s.seq == orig.seq and word in (s.words or ())}
            lo, hi = (word.start_ns - w) // h - 1, word.end_ns // h + 2
            want_in = {j * h for j in range(lo, hi) if overlaps(word.start_ns, word.end_ns,
                                                                 j * h, w)}
            assert got_in == want_in, (word, sorted(got_in), sorted(want_in))
            if h == w:
                inside = sum(word.start_ns < j * w < word.end_ns for j in range(lo, hi))
                assert len(got_in) == 1 + inside


def test_a_segment_with_the_most_words_is_cut_by_bisection() -> None:
    # a 30 s segment of 10,000 words, 3 ms each, in 100 ms windows: some words cross edges
    cfg = align_config(100, expected=("text",))
    n, step = wire.MAX_WORDS, 3 * MS
    seg = segment("s", 0, 0, n * step, words=[(f"w{i}", i * step, (i + 1) * step)
                                              for i in range(n)])
    wins = run(cfg, [seg])
    assert len(wins) == 300
    for k, win in wins.items():
        want = [i for i in range(n) if overlaps(i * step, (i + 1) * step, k, cfg.window_ns)]
        assert [x.text for x in win.segments[0].words or ()] == [f"w{i}" for i in want]
