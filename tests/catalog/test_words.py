"""How text becomes searchable words and sort keys (no database)."""

from __future__ import annotations

from actors.catalog.repository import name_key, prefix_range, words


def test_words_are_folded_without_accents_and_punctuation():
    assert words("Café CRÈME: 4-Person Tent, Straße") == ["cafe", "creme", "4", "person", "tent", "strasse"]
    assert words("!!! ---") == []
    assert len(words("x" * 100)[0]) == 40, "cut to the indexed length, for documents and queries alike"
    assert name_key("Éclair Lamp") == "eclair lamp" < name_key("Zebra Lamp")


def test_prefix_ranges_cover_exactly_the_words_that_start_with_the_prefix():
    low, high = prefix_range("tent")
    assert (low, high) == ("tent", "tenu")
    inside = ["tent", "tents", "tentative", "tent\U0010ffff"]
    outside = ["ten", "tenu", "tenz", "tem", "u"]
    assert all(low <= w < high for w in inside) and not any(low <= w < high for w in outside)
    assert prefix_range("a\ud7ff")[1] == "a\ue000", "never a surrogate: the bound must be encodable"
    assert prefix_range("a\U0010ffff") == ("a\U0010ffff", None)
