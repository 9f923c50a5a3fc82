"""The fleet benchmark's prompt text, made of words that are one token each.

A text of n such words is n tokens, whatever the tokenizer in use: the e2e tiny model's (its
words with a leading space that the vocabulary holds as one token) or the simulator's simple
one (`t<id>`). So a Mooncake block (512 tokens) is 512 words chosen from its hash id alone,
and prompts that lead with the same block ids lead with the same tokens.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

from serve_app.routing.kv.tokens import SIMPLE_VOCAB

BLOCK_TOKENS = 512  # the tokens of one Mooncake `hash_ids` entry


def single_token_words(tokenizer_json: Path) -> list[str]:
    """The words (ASCII letters) that the tokenizer encodes as one token after a space, and
    that stay one token each when joined by spaces (checked on all of them at once)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    words = []
    for token_id in range(tokenizer.get_vocab_size()):
        piece = tokenizer.decode([token_id])
        word = piece[1:]
        one_token = tokenizer.encode(piece, add_special_tokens=False).ids == [token_id]
        if piece[:1] == " " and word.isascii() and word.isalpha() and one_token:
            words.append(word)
    joined = tokenizer.encode(" " + " ".join(words), add_special_tokens=False).ids
    if len(joined) != len(words):
        raise ValueError(f"{tokenizer_json}: its one-token words merge when joined")
    if len(words) < 16:
        raise ValueError(f"{tokenizer_json}: only {len(words)} one-token words")
    return words


class Texts:
    """Texts of a known number of tokens from `words` (each one token after a space)."""

    def __init__(self, words: list[str]) -> None:
        self._words = words
        self.block = lru_cache(maxsize=50_000)(self._block)

    @classmethod
    def for_tokenizer(cls, folder: Path | None) -> Texts:
        """The words of the tokenizer folder's vocabulary; None: the simple tokenizer's."""
        if folder is None:
            return cls([f"t{i}" for i in range(SIMPLE_VOCAB)])
        return cls(single_token_words(folder / "tokenizer.json"))

    def _block(self, block_id: int) -> str:
        """`BLOCK_TOKENS` tokens, a function of the block's id alone."""
        return self.words(f"block{block_id}", BLOCK_TOKENS)

    def words(self, key: str, n: int) -> str:
        """`n` tokens drawn by `key` (a different key, a different text)."""
        return " ".join(random.Random(key).choices(self._words, k=n))

    def trace_prompt(self, hash_ids: list[int], input_length: int) -> str:
        """A Mooncake request's prompt: its blocks' texts, the last cut to `input_length`."""
        blocks = [self.block(b) for b in hash_ids]
        tail = input_length - BLOCK_TOKENS * (len(hash_ids) - 1)
        if 0 < tail < BLOCK_TOKENS:
            blocks[-1] = " ".join(blocks[-1].split()[:tail])
        return " ".join(blocks)
