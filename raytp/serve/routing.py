"""Prefix-aware routing of requests to server replicas (Serve's request-router interface).

Each replica (a TP group) has its own prefix cache, so requests that share a prompt prefix should go to one replica.
The router sends a request to the replica its *conversation key* hashes to, by rendezvous hashing over the
replicas it can route to: the key of a chat request is its first system message(s) and first user message (every
turn of one conversation has it, and different conversations spread over the replicas), of a completion the first
``prefix_chars`` characters of its prompt. The chosen replica is refused when its queue is longer than the
shortest one by more than ``imbalance_margin`` requests (queue lengths as Serve's router already caches them); the
request then goes by power of two choices, as without this router. Requests without a prompt (health, models) go
by power of two choices.

Why not Ray Serve LLM's ``PrefixCacheAffinityRouter``: it asks a shared prefix-tree actor on every request
(blocking ``ray.get`` round trips on the router's loop), and matches characters of whole prompts. Hashing costs
microseconds, needs no shared state (every ingress replica's router maps a key to the same replica), and a
replica that dies or is replaced drops out of the candidates by itself; only its keys move.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def conversation_key(args: tuple, kwargs: dict, prefix_chars: int) -> str | None:
    """The routing key of a server call's arguments (a request body first: a pydantic request, a dict, or a
    prompt string); None when there is no prompt."""
    body = args[0] if args else kwargs.get("body", kwargs.get("prompt"))
    if isinstance(body, str):
        return body[:prefix_chars]
    messages, prompt = _field(body, "messages"), _field(body, "prompt")
    if messages:
        head = []
        for message in messages:
            head.append(f"{_field(message, 'role')}:{_text(_field(message, 'content'))}")
            if _field(message, "role") == "user":
                break
        return "\n".join(head)[:prefix_chars * 4]  # a long system prompt: enough of it to tell them apart
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):  # a batch: the first decides
        prompt = prompt[0]
    if isinstance(prompt, list):  # token ids
        return ",".join(map(str, prompt[:prefix_chars // 4])) or None
    return prompt[:prefix_chars] if isinstance(prompt, str) else None


def _field(obj, name: str):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _text(content) -> str:
    if isinstance(content, str) or content is None:
        return content or ""
    return "".join(_text(_field(part, "text")) for part in content)


def rendezvous(key: str, replica_ids: list[str]) -> list[str]:
    """``replica_ids`` from the most preferred for ``key`` to the least: the same order wherever it is computed,
    and removing a replica moves only the keys it was first for."""
    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{replica_id}\0{key}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """``request_router_config.request_router_class`` of the LLMServer deployment (``raytp.serve.app``)."""

    def initialize_state(self, prefix_chars: int = 256, imbalance_margin: int = 4):
        self.prefix_chars = prefix_chars
        self.imbalance_margin = imbalance_margin

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = None
        if pending_request is not None:
            key = conversation_key(tuple(pending_request.args), dict(pending_request.kwargs), self.prefix_chars)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if key is None or len(by_id) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = [by_id[i] for i in rendezvous(key, list(by_id))]
        lengths = {r.replica_id.unique_id: self.replica_queue_len_cache.get(r.replica_id) for r in ranked}
        known = [n for n in lengths.values() if n is not None]
        first = lengths[ranked[0].replica_id.unique_id]
        if first is not None and known and first - min(known) > self.imbalance_margin:
            return [random.sample(ranked[1:], min(2, len(ranked) - 1))]
        # the preferred replica, else (it refused: full) the next ones by preference, two at a time
        return [[ranked[0]]] + [ranked[i:i + 2] for i in range(1, len(ranked), 2)]
