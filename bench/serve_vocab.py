"""Which token ids `tsukimi bench serve` puts in prompts: the served model's vocabulary without its special tokens.

Learnt from, first found: `--vocab-size N` (ids 0..N-1), `--tokenizer DIR` (the model's `tokenizer.json`: its ids
but special and unused ones; "demo" for the demo model), or the server's model card (GET /v1/models: tsukimi's
gateway lists `vocab_size` and `special_token_ids`). `--avoid-ids` are left out as well. When none says it, the
bench stops with an error rather than guess: ids beyond the vocabulary are refused, and special ids (end of text,
chat markers) make the model answer something else than the load asked for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class VocabularyUnknown(ValueError):
    """Nothing tells which token ids the served model takes."""


@dataclass(frozen=True)
class Vocabulary:
    """Prompt ids are drawn from 0..size-1 but `avoid_ids`."""

    size: int
    # Ascending, each below `size`.
    avoid_ids: tuple[int, ...]
    # Where it was learnt: "--vocab-size", "--tokenizer <dir>" or "<url>/v1/models".
    source: str

    @classmethod
    def of(cls, size: int, avoid_ids: Iterable[int], source: str) -> Vocabulary:
        avoid = tuple(sorted({i for i in avoid_ids if 0 <= i < size}))
        if len(avoid) >= size:
            raise VocabularyUnknown(f"no token id left to draw from ({source}: {size} ids, all avoided)")
        return cls(size, avoid, source)


def from_tokenizer(path: str, extra_avoid: Iterable[int] = ()) -> Vocabulary:
    """The vocabulary of a checkpoint's tokenizer ("demo": the demo model's)."""
    from tsukimi.text.tokenizer import TextTokenizer

    try:
        tokenizer = TextTokenizer.load(path)
    except (OSError, ValueError) as exc:
        raise VocabularyUnknown(f"cannot load the tokenizer of {path!r}: {exc}") from None
    size = tokenizer.vocab_size
    known = set(tokenizer.tokenizer.get_vocab(with_added_tokens=True).values())
    unused = [i for i in range(size) if i not in known]
    return Vocabulary.of(size, [*tokenizer.special_token_ids, *unused, *extra_avoid], f"--tokenizer {path}")


def from_card(card: dict, source: str, extra_avoid: Iterable[int] = ()) -> Vocabulary:
    """The vocabulary a model card lists (`vocab_size` and `special_token_ids`, both needed)."""
    size = card.get("vocab_size")
    specials = card.get("special_token_ids")
    if not (type(size) is int and size > 0 and isinstance(specials, list)
            and all(type(i) is int for i in specials)):
        raise VocabularyUnknown(
            f"{source} does not say the vocabulary of {card.get('id', 'the model')!r} (no vocab_size and "
            "special_token_ids): give --tokenizer DIR (the model's checkpoint or tokenizer directory) or "
            "--vocab-size N (with --avoid-ids for its special tokens)"
        )
    return Vocabulary.of(size, [*specials, *extra_avoid], source)
