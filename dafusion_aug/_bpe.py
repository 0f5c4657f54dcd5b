"""Build small CLIP-style byte-level BPE tokenizers offline.

The vocabulary follows CLIP's layout exactly (256 byte symbols, the same with the end-of-word marker
``</w>``, then one entry per merge, then the two special tokens), so every string tokenizes: a word the
merges do not cover falls back to single characters. Used by :func:`dafusion_aug.testing.tiny_pipeline`
and by the pocket model's training script.
"""

from __future__ import annotations

import collections
import json
import os
import re
import tempfile
from collections.abc import Iterable

__all__ = ["build_clip_tokenizer", "learn_bpe_merges"]

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's (and GPT-2's) reversible byte -> printable character table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _words(corpus: Iterable[str]) -> collections.Counter[tuple[str, ...]]:
    table = _bytes_to_unicode()
    counts: collections.Counter[tuple[str, ...]] = collections.Counter()
    for text in corpus:
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
            symbols = [table[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            counts[tuple(symbols)] += 1
    return counts


def learn_bpe_merges(corpus: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn up to ``num_merges`` BPE merges from ``corpus`` (deterministic: ties break by the pair)."""
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    words = _words(corpus)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, freq in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


def _vocab_and_merges(corpus: Iterable[str], num_merges: int) -> tuple[dict[str, int], str]:
    merges = learn_bpe_merges(corpus, num_merges)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            vocab_list.append(a + b)
            seen.add(a + b)
    vocab_list += [_BOS, _EOS]
    merges_text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    return {tok: i for i, tok in enumerate(vocab_list)}, merges_text


def build_clip_tokenizer(corpus: Iterable[str], num_merges: int = 200, model_max_length: int = 77, save_to: str | os.PathLike | None = None):
    """Return a ``transformers.CLIPTokenizer`` with a BPE vocabulary learned from ``corpus``.

    Args:
        corpus: sentences the merges are learned from (their words become single tokens).
        num_merges: how many merges to learn; 0 gives a pure character tokenizer.
        model_max_length: the tokenizer's maximum sequence length (CLIP uses 77).
        save_to: optional folder to write ``vocab.json`` and ``merges.txt`` into.

    Returns:
        A ``CLIPTokenizer`` whose pad token is ``<|endoftext|>``, as in Stable Diffusion.
    """
    from transformers import CLIPTokenizer

    vocab, merges_text = _vocab_and_merges(list(corpus), num_merges)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_to if save_to is not None else tmp
        os.makedirs(folder, exist_ok=True)
        vocab_file = os.path.join(folder, "vocab.json")
        merges_file = os.path.join(folder, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write(merges_text)
        return CLIPTokenizer(
            vocab_file,
            merges_file,
            model_max_length=model_max_length,
            pad_token=_EOS,
            bos_token=_BOS,
            eos_token=_EOS,
            unk_token=_EOS,
        )
