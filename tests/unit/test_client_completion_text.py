"""CompletionText: streamed text with stop strings and characters split across tokens, no network."""

from __future__ import annotations

import pytest

from homeswarm.client.openai_api.text import CompletionText


def pieces_decoder(pieces: list[str]):
    """A decode function over a toy vocabulary: token i is pieces[i]; b'\\xff' marks half a character."""

    def decode(ids: list[int]) -> str:
        text = "".join(pieces[i] for i in ids)
        # an unfinished character ("\xff" not yet followed by its second half "\xfe") decodes to U+FFFD
        return text.replace("\xff\xfe", "é").replace("\xff", "\ufffd")

    return decode


def stream(pieces: list[str], stops: list[str]) -> tuple[list[str], str, bool]:
    """Feed the tokens one by one: (deltas, final text, stopped)."""
    text = CompletionText(pieces_decoder(pieces), stops)
    deltas, ids = [], []
    for i in range(len(pieces)):
        ids.append(i)
        deltas.append(text.add(ids))
        if text.stopped:
            break
    if not text.stopped:
        deltas.append(text.finish(ids))
    assert "".join(deltas) == text.text
    return deltas, text.text, text.stopped


def test_no_stop_strings_shows_each_token_as_it_comes():
    deltas, final, stopped = stream(["Hello", ",", " world"], [])
    assert deltas == ["Hello", ",", " world", ""]
    assert final == "Hello, world" and not stopped


def test_text_is_cut_before_the_stop_string():
    deltas, final, stopped = stream(["The", " end", ".\n", "More"], ["end."])
    assert final == "The " and stopped
    assert deltas == ["Th", "e ", ""]  # a tail that may begin "end." waits: "e", then "end"


def test_a_stop_string_spanning_tokens():
    _, final, stopped = stream(["ab", "c", "STO", "P", "x"], ["STOP"])
    assert final == "abc" and stopped


def test_a_held_prefix_that_does_not_become_a_stop_is_shown():
    deltas, final, stopped = stream(["a", "ST", "x", "y"], ["STOP"])
    assert deltas == ["a", "", "STx", "y", ""]
    assert final == "aSTxy" and not stopped


def test_the_earliest_stop_string_wins():
    _, final, _ = stream(["one two three"], ["three", "two"])
    assert final == "one "


def test_a_character_split_across_tokens_is_held_until_whole():
    deltas, final, _ = stream(["caf", "\xff", "\xfe", "!"], [])
    assert deltas == ["caf", "", "é", "!", ""]
    assert final == "café!"


def test_finish_shows_what_was_held_back():
    deltas, final, stopped = stream(["x", "S"], ["STOP"])
    assert deltas == ["x", "", "S"] and final == "xS" and not stopped


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError, match="empty"):
        CompletionText(lambda ids: "", [""])
