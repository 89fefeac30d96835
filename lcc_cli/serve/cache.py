"""The server's memory budget: decoded, composed buffers kept in RAM, least recently used
first out, within a budget in bytes (`lcc serve --cache-mb`).

A buffer is keyed by the content of the cartridges it was built from (their manifest
digests, in the order the model name gives them), never by file name or time stamp: two
files with the same bytes share one buffer, and a file that changed is a new key. Buffers
whose cartridges are no longer served are dropped (`retain`). A buffer larger than the
whole budget is built for its request and not kept. Requests that wait for one key while it
is built wait for that build alone (one copy, not one per request); nothing else waits.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable


def buffer_bytes(buffer) -> int:
    """Bytes held by a buffer.Buffer's tensors (keys, values, biases, positions)."""
    tensors = [*buffer.keys, *buffer.values, *(buffer.bias or []), buffer.positions]
    return sum(t.numel() * t.element_size() for t in tensors)


class BufferCache:
    def __init__(self, budget_bytes: int, size_of: Callable[[object], int] = buffer_bytes):
        self.budget, self.size_of = budget_bytes, size_of
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._building: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()
        self.bytes = 0  # what the kept buffers hold now; never above `budget`
        self.peak = 0  # the most they ever held (tests)
        self.builds = 0  # buffers built (tests)

    def get_or_build(self, key: Hashable, build: Callable[[], object]):
        """The buffer for `key`, built by `build()` (in this thread) when it is not kept."""
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
            gate = self._building.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                hit = self._hit(key)
            if hit is not None:
                return hit
            try:
                value = build()
            finally:
                with self._lock:
                    self._building.pop(key, None)
            with self._lock:
                self.builds += 1
                self._keep(key, value)
            return value

    def retain(self, alive: Callable[[Hashable], bool]) -> None:
        """Drop every buffer whose key is no longer `alive` (its cartridges are gone)."""
        with self._lock:
            for key in [k for k in self._items if not alive(k)]:
                self._drop(key)

    def held_keys(self) -> list:
        with self._lock:
            return list(self._items)

    # --- under the lock ------------------------------------------------------------------------

    def _hit(self, key: Hashable):
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def _keep(self, key: Hashable, value) -> None:
        size = self.size_of(value)
        if key in self._items:
            self._drop(key)
        if size > self.budget:
            return
        while self._items and self.bytes + size > self.budget:
            self._drop(next(iter(self._items)))
        self._items[key] = (value, size)
        self.bytes += size
        self.peak = max(self.peak, self.bytes)

    def _drop(self, key: Hashable) -> None:
        _, size = self._items.pop(key)
        self.bytes -= size
