"""``tiny_text``: a seeded, character-level corpus for language modelling, generated offline.

The text comes from a small probabilistic grammar, so there is structure to learn at several
ranges: the spelling of a few dozen words, word order (determiner → adjectives → noun → verb →
object), number agreement across a prepositional phrase (``"the cat near the dogs sees a
bird."`` — the verb agrees with ``cat``, not with the nearer ``dogs``), and counting runs
(``"count four five six seven."``), whose continuation is fully determined. Sentences are
joined into one stream, which is cut into non-overlapping windows of ``context`` characters:
``x = tokens[t : t + T]`` and ``y = tokens[t + 1 : t + T + 1]``, both int64 ``[N, T]``.

The vocabulary is fixed, independent of the seed: :data:`ALPHABET` (space, full stop, a–z),
so token ids mean the same characters in every corpus; :func:`encode` and :func:`decode`
convert between text and ids.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import numpy as np
import torch
from pydantic import Field

from gradwire.worker.datasets import Dataset, Fraction01

T = TypeVar("T")

ALPHABET = " .abcdefghijklmnopqrstuvwxyz"
"""Token ``i`` is the character ``ALPHABET[i]``."""

_DET_SINGULAR = ("the", "a", "one", "every", "this")
_DET_PLURAL = ("the", "some", "two", "many", "these")
_ADJECTIVES = ("red", "big", "small", "old", "happy", "quiet", "green")
_NOUNS = ("cat", "dog", "bird", "horse", "robot", "farmer", "girl", "boy")  # plural: + "s"
# (singular, plural) verb forms; transitive verbs take an object
_TRANSITIVE = (
    ("sees", "see"), ("likes", "like"), ("chases", "chase"), ("helps", "help"), ("watches", "watch"),
)  # fmt: skip
_INTRANSITIVE = (("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("waits", "wait"))
_PREPOSITIONS = ("near", "under", "behind", "with")
_ADVERBS = ("today", "again", "slowly")
_NUMBERS = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
)  # fmt: skip

_CODES = np.full(256, -1, dtype=np.int64)
_CODES[np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)] = np.arange(len(ALPHABET))


def encode(text: str) -> np.ndarray:
    """Token ids (int64) of ``text``, which may only use the characters of :data:`ALPHABET`."""
    ids = _CODES[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
    if (ids < 0).any():
        bad = sorted({ch for ch in text if ch not in ALPHABET})
        raise ValueError(f"characters outside the tiny_text alphabet: {bad!r}")
    return ids


def decode(tokens: torch.Tensor | np.ndarray | list[int]) -> str:
    """The text of a 1-D sequence of token ids."""
    ids = tokens.tolist() if isinstance(tokens, (torch.Tensor, np.ndarray)) else list(tokens)
    return "".join(ALPHABET[int(i)] for i in ids)


class _Grammar:
    """Draws sentences with a numpy generator (one draw per choice, so a seed fixes everything)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, options: tuple[T, ...]) -> T:
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def noun_phrase(self, plural: bool, *, attach: bool) -> list[str]:
        words = [self.pick(_DET_PLURAL if plural else _DET_SINGULAR)]
        for _ in range(2):  # up to two adjectives
            if self.chance(0.35):
                words.append(self.pick(_ADJECTIVES))
        noun = self.pick(_NOUNS)
        words.append(noun + "s" if plural else noun)
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        if attach and self.chance(0.3):  # a prepositional phrase between subject and verb
            words += [self.pick(_PREPOSITIONS), *self.noun_phrase(self.chance(0.5), attach=False)]
        return words

    def counting(self) -> list[str]:
        start = int(self.rng.integers(len(_NUMBERS) - 2))
        stop = min(len(_NUMBERS), start + int(self.rng.integers(3, 7)))
        return ["count", *_NUMBERS[start:stop]]

    def sentence(self) -> str:
        if self.chance(0.15):
            words = self.counting()
        else:
            plural = self.chance(0.5)
            words = self.noun_phrase(plural, attach=True)
            if self.chance(0.65):
                words.append(self.pick(_TRANSITIVE)[int(plural)])
                words += self.noun_phrase(self.chance(0.5), attach=False)
            else:
                words.append(self.pick(_INTRANSITIVE)[int(plural)])
            if self.chance(0.2):
                words.append(self.pick(_ADVERBS))
        return " ".join(words) + "."


def generate_text(num_chars: int, seed: int = 0) -> str:
    """At least ``num_chars`` characters of the corpus for ``seed`` (whole sentences, space-separated)."""
    grammar = _Grammar(np.random.default_rng(seed))
    parts: list[str] = []
    length = 0
    while length < num_chars:
        part = grammar.sentence() + " "
        parts.append(part)
        length += len(part)
    return "".join(parts)


def tiny_text(
    *,
    seed: int = 0,
    context: Annotated[int, Field(ge=2, le=4096)] = 32,
    num_sequences: Annotated[int, Field(ge=2)] = 2048,
    test_fraction: Fraction01 = 0.1,
) -> Dataset:
    """``num_sequences`` windows of ``context`` characters of the grammar's text for ``seed``.

    The last ``test_fraction`` of the windows (at least one) are the test split: text that
    follows the training text in the stream, never a window of it.
    """
    tokens = encode(generate_text(num_sequences * context + 1, seed))
    starts = np.arange(num_sequences) * context
    offsets = np.arange(context)
    x = torch.from_numpy(tokens[starts[:, None] + offsets])
    y = torch.from_numpy(tokens[starts[:, None] + offsets + 1])
    n_test = min(max(1, round(test_fraction * num_sequences)), num_sequences - 1)
    n_train = num_sequences - n_test
    return Dataset(
        name="tiny_text",
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_test=x[n_train:],
        y_test=y[n_train:],
        num_classes=len(ALPHABET),
        task="language_model",
    )
