"""Tokenizing follow-up prompts: a long text that shares a prefix with a recently tokenized one (the same
document, a new question) reuses that text's token ids up to a synchronisation point and tokenizes only the
rest. Tokenizing a 130 kB document takes ~60 ms on a server CPU: more than a GPU needs to answer a follow-up
whose K/V are cached.

Why the result equals tokenizing the whole text: fast tokenizers split text into pre-tokens (words, spaces,
punctuation) scanning left to right, and the ids of a pre-token depend only on it. Up to shortly before the
point where the two texts differ, the new text's tokens are the old text's. A tokenization of the new text
started some way before that point (``overlap`` characters) falls into step with the whole-text one at a
pre-token boundary; from there on both give the same ids. The cut is taken at a token start where the old ids
and the restarted ids agree, and they must keep agreeing on every token up to ``guard`` characters before the
difference (hundreds of tokens): a restarted tokenization that was not in step would not reproduce that many
tokens. When no such point exists (short texts, no shared prefix, a tokenizer without offsets) the whole
text is tokenized.

A first long text is tokenized the same way in parallel: cut into overlapping pieces tokenized in one batch
(the Rust tokenizer spreads a batch over its threads; a single text uses one), joined at checked points. On
the H200 machine's CPU a 32k-token document took 137 ms to tokenize as one text.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class _Entry:
    text: str
    ids: np.ndarray  # int64 token ids
    starts: np.ndarray  # int64 character offset where each token starts (-1: an added special token)


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings (binary search over C-level slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixTokenizer:
    """``encode(text, add_special_tokens)`` with reuse of recent long texts' ids (module docstring)."""

    def __init__(self, tokenizer, *, entries: int = 8, min_chars: int = 8192, overlap: int = 4096,
                 guard: int = 512, piece_chars: int = 32768, workers: int | None = None):
        self.tokenizer = tokenizer
        self.piece_chars = piece_chars
        if workers is None:  # the tokenizer's threads work on a batch only when its parallelism is on
            off = os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("0", "false", "no", "off")
            workers = 1 if off else min(16, os.cpu_count() or 1)
        self.workers = workers
        self.entries = entries
        self.min_chars = min_chars
        self.overlap = overlap
        self.guard = guard
        self.enabled = bool(getattr(tokenizer, "is_fast", False)) and entries > 0
        self._cache: OrderedDict[tuple[bool, int], _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self._specials = self._probe_specials() if self.enabled else None
        self.reused = 0  # texts tokenized from a cached prefix (for tests and logs)
        self.split = 0  # texts tokenized as parallel pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not self.enabled or len(text) < self.min_chars:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        with self._lock:
            best, shared = None, 0
            for key, e in self._cache.items():
                if key[0] != add_special_tokens:
                    continue
                n = common_prefix_len(e.text, text)
                if n > shared:
                    best, shared = key, n
            entry = self._cache.pop(best) if best is not None else None
        ids = starts = None
        if entry is not None and shared == len(text) == len(entry.text):
            ids, starts = entry.ids, entry.starts
        elif entry is not None and shared >= self.overlap + self.guard:
            got = self._splice(entry, text, shared)
            if got is not None:
                ids, starts = got
                self.reused += 1
        if ids is None:
            ids, starts = self._full(text, add_special_tokens)
        with self._lock:
            if entry is not None and entry.text != text:
                self._put(add_special_tokens, entry)  # the old text stays available (other follow-ups)
            self._put(add_special_tokens, _Entry(text, ids, starts))
        return ids.tolist()

    # -- internals ---------------------------------------------------------------------------------------
    def _put(self, special: bool, entry: _Entry) -> None:
        for key in [k for k, e in self._cache.items() if e.text == entry.text and k[0] == special]:
            del self._cache[key]
        self._cache[(special, self._next)] = entry
        self._next += 1
        while len(self._cache) > self.entries:
            self._cache.popitem(last=False)

    def _full(self, text: str, special: bool):
        if self.workers > 1 and len(text) >= 2 * self.piece_chars:
            got = self._parallel(text, special)
            if got is not None:
                return got
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        return _ids_and_starts(enc, self.tokenizer, 0)

    def _parallel(self, text: str, special: bool):
        """A long text tokenized as overlapping pieces in one batch (the tokenizer's threads work on them in
        parallel), stitched at checked synchronisation points; None when a piece does not fall in step."""
        added = self._added_specials(special)
        if added is None:
            return None
        n = len(text)
        k = min(self.workers, n // self.piece_chars)
        cuts = [n * i // k for i in range(k + 1)]
        spans = [(max(0, cuts[i] - self.overlap), min(n, cuts[i + 1] + 2 * self.guard)) for i in range(k)]
        enc = self.tokenizer([text[a:b] for a, b in spans], add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = _ids_and_starts({"input_ids": enc["input_ids"][0], "offset_mapping": enc["offset_mapping"][0]},
                                      self.tokenizer, spans[0][0])
        for i in range(1, k):
            p_ids, p_abs = _ids_and_starts({"input_ids": enc["input_ids"][i],
                                            "offset_mapping": enc["offset_mapping"][i]}, self.tokenizer, spans[i][0])
            cut = _sync(ids, starts, p_ids, p_abs, spans[i][0], spans[i - 1][1] - self.guard)
            if cut is None:
                return None
            ie, ip = cut
            ids, starts = np.concatenate((ids[:ie], p_ids[ip:])), np.concatenate((starts[:ie], p_abs[ip:]))
        if len(added):
            ids = np.concatenate((np.asarray(added, dtype=np.int64), ids))
            starts = np.concatenate((np.full(len(added), -1, dtype=np.int64), starts))
        self.split += 1
        return ids, starts

    def _added_specials(self, special: bool):
        """The ids the tokenizer puts before a text (a BOS) with ``special``; None when it also appends some
        (then pieces cannot simply be joined). Probed once, at construction."""
        return self._specials if special else []

    def _probe_specials(self):
        with_sp = list(self.tokenizer("a b", add_special_tokens=True)["input_ids"])
        plain = list(self.tokenizer("a b", add_special_tokens=False)["input_ids"])
        m = len(with_sp) - len(plain)
        if m < 0 or with_sp[m:] != plain:
            return None
        return with_sp[:m]

    def _splice(self, entry: _Entry, text: str, shared: int):
        """ids of ``text`` from ``entry``'s ids before a synchronisation point and a restarted tokenization
        after it; None when no point passes the check."""
        e_starts = entry.starts
        if e_starts[-1] < 0:  # the tokenizer appends special tokens (an EOS): not spliced
            return None
        restart_from = shared - self.overlap
        # the restart begins at a token start of the old ids (a special token cannot be cut)
        i0 = int(np.searchsorted(e_starts, restart_from, side="left"))
        if i0 >= len(e_starts) or e_starts[i0] < 0:
            return None
        s = int(e_starts[i0])
        enc = self.tokenizer(text[s:], add_special_tokens=False, return_offsets_mapping=True)
        r_ids, r_abs = _ids_and_starts(enc, self.tokenizer, s)
        cut = _sync(entry.ids, e_starts, r_ids, r_abs, s, shared - self.guard)
        if cut is None:
            return None
        ie, ir = cut
        return np.concatenate((entry.ids[:ie], r_ids[ir:])), np.concatenate((e_starts[:ie], r_abs[ir:]))


def _sync(a_ids, a_starts, b_ids, b_starts, lo: int, check_end: int):
    """(i, j): the earliest token start x > lo shared by tokenization a (right up to ``check_end``) and b (a
    restart at ``lo``, right once in step) such that every token of a starting in [x, check_end) is b's
    token at the same place (at least 32 of them); a[:i] + b[j:] is then the whole-text tokenization."""
    a_hi = int(np.searchsorted(a_starts, check_end, side="left"))
    a_lo = int(np.searchsorted(a_starts, lo, side="right"))
    common = np.intersect1d(a_starts[a_lo:a_hi], b_starts[1:])
    for x in common[:8]:  # the earliest candidates (a restart falls in step within a word or two)
        i = int(np.searchsorted(a_starts, x, side="left"))
        j = int(np.searchsorted(b_starts, x, side="left"))
        n = a_hi - i
        if n < 32 or j + n > len(b_ids):
            return None
        if np.array_equal(a_ids[i:a_hi], b_ids[j : j + n]) and np.array_equal(a_starts[i:a_hi], b_starts[j : j + n]):
            return i, j
    return None


def _ids_and_starts(enc, tokenizer, base: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, start offsets + base) of an encoding with offsets; -1 for added special tokens (empty offsets
    and a special id: a BOS the tokenizer put in, not text)."""
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    off = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts = off[:, 0] + base
    empty = off[:, 0] == off[:, 1]
    if empty.any():
        special = np.asarray(sorted(getattr(tokenizer, "all_special_ids", []) or []), dtype=np.int64)
        starts[empty & np.isin(ids, special)] = -1
    return ids, starts
