"""Prefix reuse: the HisaCaches of finished requests, kept in an LRU keyed by the token ids they hold.

A new prompt takes the entry sharing its longest prefix (the entry leaves the LRU: a cache is owned by
one sequence at a time), crops it to the shared length and prefills only the rest. Bounded by a token
budget counted on allocated cache capacity (what the memory really holds)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


# a prompt sharing at least this fraction of an entry's tokens takes the entry's cache; less, a copy of the
# shared prefix (the entry stays for follow-ups on its own document)
TAKE_FRACTION = 0.5


@dataclass
class Entry:
    tokens: torch.Tensor  # int64 [L] on the CPU: the tokens whose K/V the cache holds
    cache: object  # HisaCache
    tag: object = None  # the attention settings that computed it (K/V of deeper layers depend on them)

    @property
    def capacity(self) -> int:
        layers = getattr(self.cache, "layers", None) or []
        return max((getattr(layer, "capacity", 0) for layer in layers), default=0) or len(self.tokens)

    def nbytes(self) -> dict:
        return self.cache.nbytes()


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    m = min(len(a), len(b))
    if m == 0:
        return 0
    diff = (a[:m] != b[:m]).nonzero()
    return int(diff[0]) if len(diff) else m


class PrefixCache:
    def __init__(self, max_tokens: int, min_match: int = 1):
        self.max_tokens = max(0, int(max_tokens))
        self.min_match = max(1, min_match)
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()  # the engine thread mutates, /metrics reads
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        with self._lock:
            return sum(e.capacity for e in self._entries.values())

    def nbytes(self) -> dict:
        total = {"kv": 0, "pooled": 0}
        with self._lock:
            for e in self._entries.values():
                for k, v in e.nbytes().items():
                    total[k] = total.get(k, 0) + v
        return total

    def take(self, prompt: torch.Tensor, tag=None, capacity: int | None = None) -> tuple[object | None, int]:
        """(cache, shared length) for ``prompt`` from the entry computed with the same ``tag`` that shares the
        longest prefix with it; (None, 0) when none shares at least ``min_match`` tokens.

        When the prompt continues most of the entry (a follow-up on the same document, the next turn of a
        chat) the entry leaves the LRU and its cache is returned; when it shares only a small part (another
        document after the same system prompt) the shared tokens are copied into a new cache with room for
        ``capacity`` tokens and the entry stays, for its own follow-ups."""
        best_key, best_len = None, 0
        with self._lock:
            for key, entry in self._entries.items():
                if entry.tag != tag:
                    continue
                n = common_prefix(entry.tokens, prompt)
                if n > best_len:
                    best_key, best_len = key, n
            if best_key is None or best_len < self.min_match:
                self.misses += 1
                return None, 0
            self.hits += 1
            entry = self._entries[best_key]
            if best_len >= TAKE_FRACTION * len(entry.tokens):
                del self._entries[best_key]
                return entry.cache, best_len
            self._entries.move_to_end(best_key)  # used: most recent
            return entry.cache.clone_prefix(best_len, capacity), best_len

    def put(self, tokens: torch.Tensor, cache, tag=None) -> None:
        """Keep ``cache`` (holding K/V of ``tokens``); evicts least recently used entries over budget.
        Entries whose tokens are a prefix of the new one are dropped (the new one serves them too)."""
        if self.max_tokens <= 0 or len(tokens) == 0:
            cache.release()
            return
        entry = Entry(tokens.detach().to("cpu", torch.long), cache, tag)
        if entry.capacity > self.max_tokens:
            cache.release()
            return
        with self._lock:
            for key in [k for k, e in self._entries.items()
                        if e.tag == tag and common_prefix(e.tokens, entry.tokens) == len(e.tokens)]:
                self._entries.pop(key).cache.release()
            self._entries[self._next] = entry
            self._next += 1
        self.evict_to(self.max_tokens)

    def evict_to(self, max_tokens: int) -> int:
        """Evict LRU entries until at most ``max_tokens`` are held; returns tokens freed."""
        freed = 0
        with self._lock:
            while self._entries and sum(e.capacity for e in self._entries.values()) > max_tokens:
                _, entry = self._entries.popitem(last=False)
                freed += entry.capacity
                entry.cache.release()
        return freed

    def clear(self) -> None:
        self.evict_to(0)
