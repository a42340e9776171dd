"""TextStream: text is shown only once it cannot change, and a stop string cuts it exactly."""

from __future__ import annotations

import inspect

import pytest
import torch

from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.stop import TextStream


def pieces_stream(pieces: list[str], stop: list[str]) -> tuple[TextStream, list[str]]:
    """A stream whose token i decodes to pieces[i], and the text each push showed."""
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop)
    shown = []
    for token in range(len(pieces)):
        shown.append(stream.push(token))
        if stream.stopped:
            break
    return stream, shown


def test_a_stop_string_split_over_tokens_is_held_back_then_cut():
    stream, shown = pieces_stream(["ab", "E", "N", "D", "never"], stop=["END"])
    assert shown == ["ab", "", "", ""]  # "E", "EN" could still become "END"
    assert stream.stopped and stream.n_tokens == 4 and stream.text == "ab"
    assert stream.finish() == ""


def test_a_tail_that_does_not_become_the_stop_string_is_shown_late_but_whole():
    stream, shown = pieces_stream(["ab", "EN", "x", "E"], stop=["END"])
    assert shown == ["ab", "", "ENx", ""]
    assert not stream.stopped and stream.finish() == "E" and stream.text == "abENxE"


def test_the_cut_is_inside_a_token_and_at_the_first_of_several_stop_strings():
    stream, shown = pieces_stream(["a", "bXY", "Zc", "d"], stop=["Zc", "XY"])
    assert stream.stopped and stream.n_tokens == 2 and stream.text == "ab"
    assert "".join(shown) == "ab"


def test_without_stop_strings_the_stream_is_the_decoded_text():
    stream, shown = pieces_stream(["de", "f ", "x"], stop=[])
    assert shown == ["de", "f ", "x"] and stream.finish() == ""


def test_a_character_split_over_byte_tokens_is_shown_only_when_whole():
    """A real byte-level BPE tokenizer that has not learned the characters: they are single bytes."""
    tokenizer = train_tokenizer([inspect.getsource(torch.nn.Module)], vocab_size=512)
    text = "x = 'é→ok' # ∑"
    ids = tokenizer.encode(text).ids
    stream = TextStream(tokenizer.decode, stop=["ok'"])
    shown = []
    for token in ids:
        shown.append(stream.push(token))
        if stream.stopped:
            break
    assert not any("\ufffd" in piece for piece in shown)
    assert stream.stopped and "".join(shown) == stream.text == "x = 'é→"
    # Not vacuous: some prefix of the tokens does end inside a character.
    assert any(tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))


def test_pushing_after_the_stop_is_an_error():
    stream, _ = pieces_stream(["END"], stop=["END"])
    with pytest.raises(ValueError, match="after a stop string"):
        stream.push(0)
