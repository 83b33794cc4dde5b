"""Prefix-aware routing (raytp/serve/routing.py): what a request's key is, the rendezvous order, and the router's
choice — the preferred replica while queues are balanced, power of two choices when it is overloaded or there is no
prompt."""

import asyncio
import random
from types import SimpleNamespace

from raytp.api.protocol import ChatCompletionRequest, CompletionRequest
from raytp.serve.routing import PrefixAffinityRouter, conversation_key, rendezvous


def chat(*messages):
    return ChatCompletionRequest(model="m", messages=[{"role": r, "content": c} for r, c in messages])


def test_a_conversation_keeps_its_key_turn_after_turn_and_conversations_differ():
    turn1 = chat(("system", "You are terse."), ("user", "Plan a trip to Oslo"))
    turn2 = chat(("system", "You are terse."), ("user", "Plan a trip to Oslo"), ("assistant", "Day 1: ..."),
                 ("user", "Add a museum"))
    other = chat(("system", "You are terse."), ("user", "Explain TCP"))
    assert conversation_key((turn1,), {}, 256) == conversation_key((turn2,), {}, 256)
    assert conversation_key((turn1,), {}, 256) != conversation_key((other,), {}, 256)
    parts = ChatCompletionRequest(model="m", messages=[
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": "Plan a trip to Oslo"}])
    assert conversation_key((parts,), {}, 256) == conversation_key((turn1,), {}, 256)


def test_completion_keys_are_the_prompts_first_characters_in_every_form():
    shared = "Translate to French. " * 20  # a few-shot header longer than the key
    a, b = CompletionRequest(model="m", prompt=shared + "cat"), CompletionRequest(model="m", prompt=shared + "dog")
    assert conversation_key((a,), {}, 256) == conversation_key((b,), {}, 256) == shared[:256]
    assert conversation_key(({"model": "m", "prompt": ["x y", "z"]},), {}, 256) == "x y"  # a handle's dict body
    assert conversation_key(("plain prompt",), {"max_tokens": 3}, 256) == "plain prompt"  # generate()
    assert conversation_key((CompletionRequest(model="m", prompt=[5, 6, 7]),), {}, 256) == "5,6,7"
    assert conversation_key(("the-model-id",), {}, 256) == "the-model-id"  # harmless: any string routes somewhere
    assert conversation_key((), {}, 256) is None  # health, models


def test_rendezvous_is_stable_and_moves_only_a_removed_replicas_keys():
    replicas = [f"r{i}" for i in range(4)]
    keys = [f"conversation {i}" for i in range(400)]
    first = {k: rendezvous(k, replicas)[0] for k in keys}
    assert first == {k: rendezvous(k, list(reversed(replicas)))[0] for k in keys}  # order of candidates is moot
    assert all(100 - 40 < list(first.values()).count(r) < 100 + 40 for r in replicas)  # spread evenly
    after = {k: rendezvous(k, replicas[:3])[0] for k in keys}
    assert all(after[k] == first[k] for k in keys if first[k] != "r3")


class _Router(PrefixAffinityRouter):
    """The routing policy alone: no Serve router machinery, queue lengths given."""

    def __init__(self, lengths: dict):
        self.lengths = lengths
        self.initialize_state(prefix_chars=256, imbalance_margin=4)

    @property
    def replica_queue_len_cache(self):
        return SimpleNamespace(get=lambda replica_id: self.lengths.get(replica_id.unique_id))


def replica(name: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name))


def choose(router, replicas, body):
    request = None if body is None else SimpleNamespace(args=[body, "rid"], kwargs={})
    return asyncio.run(router.choose_replicas(replicas, request))


def test_the_router_prefers_the_keys_replica_until_its_queue_is_too_long():
    random.seed(0)
    replicas = [replica(f"r{i}") for i in range(3)]
    body = CompletionRequest(model="m", prompt="a shared prefix")
    preferred = rendezvous("a shared prefix", ["r0", "r1", "r2"])
    ranks = choose(_Router({"r0": 2, "r1": 2, "r2": 2}), replicas, body)
    assert [r.replica_id.unique_id for r in ranks[0]] == preferred[:1]
    assert [r.replica_id.unique_id for rank in ranks for r in rank] == preferred  # then the rest, by preference
    # the preferred replica's queue is 5 longer than the shortest (margin 4): power of two over the others
    ranks = choose(_Router({preferred[0]: 7, preferred[1]: 2, preferred[2]: 3}), replicas, body)
    assert len(ranks) == 1 and preferred[0] not in {r.replica_id.unique_id for r in ranks[0]}
    # 4 longer is within the margin
    ranks = choose(_Router({preferred[0]: 6, preferred[1]: 2, preferred[2]: 3}), replicas, body)
    assert ranks[0][0].replica_id.unique_id == preferred[0]


def test_requests_without_a_prompt_and_single_replicas_go_by_power_of_two():
    replicas = [replica(f"r{i}") for i in range(3)]
    ranks = choose(_Router({}), replicas, None)
    assert len(ranks) == 1 and len(ranks[0]) == 2
    assert choose(_Router({}), replicas[:1], CompletionRequest(model="m", prompt="x")) == [replicas[:1]]
    assert choose(_Router({}), [], None) == []
