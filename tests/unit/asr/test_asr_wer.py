from streamproc.asr.wer import Wer, total, wer


def test_word_error_rate_counts_edits_over_reference_words() -> None:
    assert wer("seven three one", "seven three one") == Wer(0, 3)
    assert wer("Seven, three one!", "seven tree") == Wer(2, 3)  # a substitution, a deletion
    assert wer("one", "uh one two").errors == 2  # two insertions
    assert wer("", "").rate == 0.0
    assert total([("a b", "a"), ("c", "c d")]) == Wer(2, 3)
    assert str(Wer(1, 4)) == "25.0% (1 errors / 4 words)"
