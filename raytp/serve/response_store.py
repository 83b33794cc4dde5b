"""The Responses API's store: responses kept by id in the ingress process, for ``GET /v1/responses/{id}`` and
``previous_response_id``.

In memory and bounded, so a long-running server's memory does not grow with its traffic (vLLM's store has no
bound, and is off by default for that reason): at most ``max_entries`` responses, none older than ``max_age_s``;
the oldest go first. Each ingress replica has its own store, so with several ingress replicas a follow-up turn
must reach the replica that answered the first (or the client sends the whole conversation with store false).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredResponse:
    """A Response object and its whole conversation (stored items: the input, with any earlier turns, then the
    output), which a next turn continues."""

    response: dict
    conversation: list[dict]


class ResponseStore:
    def __init__(self, max_entries: int = 1000, max_age_s: float = 3600.0, clock=time.monotonic):
        assert max_entries >= 1 and max_age_s > 0
        self.max_entries, self.max_age_s, self._clock = max_entries, max_age_s, clock
        self._entries: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()  # oldest first

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._entries.pop(response_id, None)
        self._entries[response_id] = (self._clock(), stored)
        self._evict()

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None if it was never stored or has been evicted."""
        self._evict()
        entry = self._entries.get(response_id)
        return entry[1] if entry else None

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> None:
        oldest_kept = self._clock() - self.max_age_s
        while self._entries and (len(self._entries) > self.max_entries
                                 or next(iter(self._entries.values()))[0] < oldest_kept):
            self._entries.popitem(last=False)
