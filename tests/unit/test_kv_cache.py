"""The driver's block bookkeeping: all-or-nothing allocation, the null block, prefix sharing, LRU eviction."""

import pytest

from raytp.engine.kv_cache import BlockManager, KVState


def filled(bm: BlockManager, tokens: list[int]) -> KVState:
    """A sequence holding ``tokens``, all computed."""
    kv = KVState()
    assert bm.allocate(kv, len(tokens))
    bm.commit(kv, tokens, len(tokens))
    return kv


def hit(bm: BlockManager, tokens: list[int]) -> int:
    """Cached tokens a new sequence of ``tokens`` would reuse (the lookup's references are released again)."""
    kv = KVState()
    n = bm.reuse_prefix(kv, tokens)
    bm.free(kv)
    return n


def test_allocation_is_all_or_nothing_and_never_hands_out_the_null_block():
    bm = BlockManager(num_blocks=5, block_size=4)
    a, b = KVState(), KVState()
    assert bm.allocate(a, 9) and a.table == [1, 2, 3]  # 3 blocks for 9 tokens
    assert not bm.allocate(b, 9) and b.table == [] and bm.num_free == 1
    assert bm.allocate(a, 12) and len(a.table) == 3  # still fits in the blocks it has
    assert bm.usage == pytest.approx(0.75)
    bm.free(a)
    assert bm.num_free == 4 and bm.allocate(b, 16) and 0 not in b.table


def test_prefix_blocks_are_shared_and_at_least_one_token_is_left_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    a = filled(bm, prompt)
    b = KVState()
    assert bm.reuse_prefix(b, prompt + [7, 8, 9]) == 8 and b.table == a.table[:2]
    c = KVState()
    assert bm.reuse_prefix(c, prompt[:8]) == 4, "8 tokens: the last full block is recomputed for its logits"
    assert hit(bm, [1] + prompt[1:]) == 0, "a different first token changes every block's hash"
    bm.free(a)
    assert bm.num_free == 16 - 1 - 2, "blocks b and c still reference stay taken"


def test_same_tokens_after_a_different_prefix_do_not_match():
    bm = BlockManager(num_blocks=16, block_size=2)
    filled(bm, [1, 2, 3, 4, 5])
    assert hit(bm, [9, 9, 3, 4, 5]) == 0


def test_freed_prefixes_stay_cached_until_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    old, new = [1, 2, 3], [4, 5, 6]
    a = filled(bm, old)  # blocks 1, 2 (block 2 holds one token: never cached)
    bm.free(a)
    b = filled(bm, new)  # takes the never-hashed blocks first: 2 (old's partial tail), then 3
    bm.free(b)
    hog = KVState()
    assert bm.allocate(hog, 6)  # 3 blocks: the uncached ones, then the least recently freed cached one
    assert hit(bm, old + [0]) == 0, "old was freed first: evicted first"
    assert hit(bm, new + [0]) == 2


def test_prefix_caching_off_reuses_nothing():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    filled(bm, [1, 2, 3, 4, 5])
    assert hit(bm, [1, 2, 3, 4, 5]) == 0


def test_concurrent_sequences_grow_into_consecutive_blocks():
    """Ranks attend to consecutive blocks in place (no copy), so placement keeps each sequence's blocks together."""
    bm = BlockManager(num_blocks=65, block_size=4, enable_prefix_caching=False)
    seqs = [KVState() for _ in range(4)]
    for kv in seqs:
        assert bm.allocate(kv, 8)
    for tokens in range(9, 41):  # the four grow in turns, as decoding rows do
        for kv in seqs:
            assert bm.allocate(kv, tokens)
    for kv in seqs:
        assert len(kv.table) == 10 and kv.table == list(range(kv.table[0], kv.table[0] + 10)), kv.table


def reference_place(bm: BlockManager, table: list[int]) -> int:
    """Placement as the docstring of ``BlockManager._place`` states it, by sorting every free block."""
    nxt = table[-1] + 1 if table else 0
    clean = sorted(b for b in bm._free if bm._hash_of[b] is None)
    if nxt in clean:
        return nxt
    runs, start = [], None
    for i, b in enumerate(clean):
        if start is None or b != clean[i - 1] + 1:
            start = b
            runs.append([b, 0])
        runs[-1][1] += 1
    if runs:
        best_start, best_len = max(runs, key=lambda r: (r[1], -r[0]))
        return best_start if best_start == 1 else best_start + best_len // 2
    return next(iter(bm._free))


def test_placement_keeps_its_policy_through_random_allocations_frees_and_cached_prefixes():
    """The runs of free uncached blocks are tracked as blocks come and go, not recomputed: every placement of a
    random workload (growing, finishing, prefix hits, evictions) is the block the sort-everything rule picks."""
    import random

    rng = random.Random(0)
    bm = BlockManager(num_blocks=97, block_size=2)
    live: list[tuple[KVState, list[int]]] = []
    placements = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.5 and live:  # grow a sequence by a few tokens
            kv, tokens = rng.choice(live)
            tokens += [rng.randrange(4) for _ in range(rng.randrange(1, 5))]
            while len(kv.table) < bm.blocks_for(len(tokens)) and bm.num_free:
                expected = reference_place(bm, kv.table)
                assert bm.allocate(kv, (len(kv.table) + 1) * bm.block_size)
                assert kv.table[-1] == expected
                placements += 1
            bm.commit(kv, tokens, min(len(tokens), len(kv.table) * bm.block_size))
        elif op < 0.7 and live:  # finish one
            kv, _ = live.pop(rng.randrange(len(live)))
            bm.free(kv)
        else:  # a new sequence, maybe on a cached prefix (few distinct tokens: prefixes repeat)
            tokens = [rng.randrange(2) for _ in range(rng.randrange(3, 12))]
            kv = KVState()
            bm.reuse_prefix(kv, tokens)
            live.append((kv, tokens))
        runs = bm._clean.runs()
        assert sum(e - s for s, e in runs) == sum(1 for b in bm._free if bm._hash_of[b] is None)
        assert all(e < s2 for (_, e), (s2, _) in zip(runs, runs[1:])), "runs are maximal and disjoint"
    assert placements > 500
