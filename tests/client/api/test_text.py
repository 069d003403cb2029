"""Text deltas: streamed pieces add up to the whole decode, cut at the first stop string."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from brigade.client.api.text import TextStream
from brigade.kernels.default_model import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer():  # byte-level BPE: single tokens can be half a UTF-8 character
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def stream_all(tokenizer, tokens: list[int], stop: list[str]) -> tuple[list[str], bool]:
    text = TextStream(tokenizer, stop)
    pieces = [text.push(token) for token in tokens]
    if not text.stopped:
        pieces.append(text.finish())
    return [piece for piece in pieces if piece], text.stopped


@pytest.mark.parametrize("sample", ["def f(x):\n    return x  # é, ü, 漢字 and 🙂", "plain ascii"])
def test_pieces_add_up_to_the_whole_decode(tokenizer, sample: str) -> None:
    tokens = tokenizer(sample, add_special_tokens=False).input_ids
    pieces, stopped = stream_all(tokenizer, tokens, [])
    assert "".join(pieces) == tokenizer.decode(tokens) == sample
    assert not stopped
    assert all("\ufffd" not in piece for piece in pieces), "half characters are held back, never sent"


def test_stop_string_cuts_the_text_and_is_never_sent(tokenizer) -> None:
    sample = "alpha beta\n\ngamma delta"
    tokens = tokenizer(sample, add_special_tokens=False).input_ids
    pieces, stopped = stream_all(tokenizer, tokens, ["\n\n", "zzz"])
    assert stopped and "".join(pieces) == "alpha beta"
    assert all("\n" not in piece for piece in pieces), "a possible stop string's start is held back"


def test_a_stop_string_across_tokens_and_a_false_start(tokenizer) -> None:
    sample = "x = 1 END? no, END!"
    tokens = tokenizer(sample, add_special_tokens=False).input_ids
    pieces, stopped = stream_all(tokenizer, tokens, ["END!"])
    assert stopped and "".join(pieces) == "x = 1 END? no, "


def test_special_tokens_are_skipped(tokenizer) -> None:
    tokens = [tokenizer.bos_token_id, *tokenizer("ok", add_special_tokens=False).input_ids]
    pieces, _ = stream_all(tokenizer, tokens, [])
    assert "".join(pieces) == "ok"
