"""The paged KV cache's bookkeeping, owned by the driver: which blocks each sequence holds. Pure Python.

Every rank preallocates the same number of fixed-size blocks (``block_size`` token slots, its share of
heads, every layer); this class decides which sequence uses which block, and the block tables travel to
the ranks in each step (``raytp.messages.RowInput``), so ranks never allocate and cannot disagree.

Block 0 is the null block: never handed out, zeroed on the ranks, the target of padding when the ranks
gather a batch's keys. Prefix caching (vLLM's design, re-implemented here because the driver must own
the tables; transformers' ``PagedAttentionCache`` allocates on its own): a block whose ``block_size``
tokens are all computed gets a hash of its tokens chained with its predecessor's hash, so equal hashes
mean equal prefixes. A new sequence takes over the cached blocks of its longest matching prefix and
computes only the rest. A freed block keeps its contents and hash until it is reused; free blocks are
reused least-recently-freed first (blocks that never held a full hash first of all), so popular
prefixes survive longest.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class KVState:
    """One sequence's blocks: ``table`` in position order, and the chain hashes of its leading full blocks."""

    table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


def block_hash(parent: bytes, tokens) -> bytes:
    """Identity of a full block: its tokens and (through ``parent``) every token before it."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens))
    return h.digest()


class FreeRuns:
    """The maximal runs of consecutive blocks that are free and cache nothing, kept up to date as blocks are taken
    and freed, so the longest run is found in O(log n): placement used to sort every free block, ~57 ms per new
    sequence with the tiny model's 500k blocks, on the engine core's thread. A run is [start, end)."""

    def __init__(self, first: int, end: int):
        self._starts: list[int] = []  # sorted
        self._end_of: dict[int, int] = {}
        self._heap: list[tuple[int, int, int]] = []  # (-length, start, end): longest, then lowest start; lazy
        if end > first:
            self._add(first, end)

    def runs(self) -> list[tuple[int, int]]:
        """Every run, in block order."""
        return [(s, self._end_of[s]) for s in self._starts]

    def _add(self, start: int, end: int) -> None:
        bisect.insort(self._starts, start)
        self._end_of[start] = end
        heapq.heappush(self._heap, (start - end, start, end))
        if len(self._heap) > 4 * len(self._starts) + 64:  # drop stale entries now and then
            self._heap = [(s - e, s, e) for s, e in self.runs()]
            heapq.heapify(self._heap)

    def _drop(self, start: int) -> int:
        del self._starts[bisect.bisect_left(self._starts, start)]
        return self._end_of.pop(start)

    def add(self, block: int) -> None:
        """``block`` is now free and caches nothing: joins the runs on either side."""
        start, end = block, block + 1
        if end in self._end_of:
            end = self._drop(end)
        before = bisect.bisect_left(self._starts, block) - 1  # the run that may end right at ``block``
        if before >= 0 and self._end_of[self._starts[before]] == block:
            start = self._starts[before]
            self._drop(start)
        self._add(start, end)

    def remove(self, block: int) -> None:
        """``block``, in a run, is taken: its run splits around it."""
        start = self._starts[bisect.bisect_right(self._starts, block) - 1]
        end = self._drop(start)
        assert start <= block < end, (block, start, end)
        if start < block:
            self._add(start, block)
        if block + 1 < end:
            self._add(block + 1, end)

    def longest(self) -> tuple[int, int] | None:
        """(start, length) of the longest run, the lowest start among equals; None if there is none."""
        while self._heap:
            neg, start, end = self._heap[0]
            if self._end_of.get(start) == end:
                return start, -neg
            heapq.heappop(self._heap)
        return None


class BlockManager:
    """Allocates ``num_blocks - 1`` usable blocks of ``block_size`` slots among sequences."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("need at least one usable block besides the null block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> block holding that prefix
        # free blocks, next to reuse first; a freed block that holds a cached prefix goes last (evicted last)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._clean = FreeRuns(1, num_blocks)  # the free blocks that cache nothing, as runs (placement)
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- capacity ------------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by sequences (free blocks that merely cache a prefix count as free)."""
        return 1.0 - self.num_free / self.num_usable

    @property
    def capacity_tokens(self) -> int:
        return self.num_usable * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- per sequence -----------------------------------------------------------------------------
    def reuse_prefix(self, kv: KVState, token_ids: list[int]) -> int:
        """Give an empty ``kv`` the cached blocks of ``token_ids``' longest cached prefix; return the number of
        tokens they hold. At least two tokens are always left to compute (the last one's logits give the next
        token): a one-token chunk runs every linear at M = 1, which CPU GEMM libraries compute by another path, with
        other rounding, than the same row inside a longer chunk, so the cache would change the answer (oneDNN here:
        bf16 and float32 rows agree for every M >= 2, not at M = 1; tests/unit/test_deterministic.py)."""
        assert not kv.table, "prefix reuse is for a sequence that holds no blocks"
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        parent = b""
        for i in range((len(token_ids) - 2) // bs):
            h = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            block = self._cached.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            kv.table.append(block)
            kv.hashes.append(h)
            parent = h
        return len(kv.table) * bs

    def record_lookup(self, num_tokens: int, num_hit: int) -> None:
        """Count an admitted sequence's prefix lookup (for the hit rate; failed admissions retry and are not)."""
        self.prefix_queried_tokens += num_tokens
        self.prefix_hit_tokens += num_hit

    def allocate(self, kv: KVState, num_tokens: int) -> bool:
        """Grow ``kv`` to hold ``num_tokens`` tokens. All or nothing: False (nothing taken) if too few are free."""
        need = self.blocks_for(num_tokens) - len(kv.table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        for _ in range(need):
            block = self._place(kv.table)
            del self._free[block]
            old = self._hash_of[block]
            if old is None:
                self._clean.remove(block)
            else:  # evict the prefix this block cached
                self._hash_of[block] = None
                if self._cached.get(old) == block:
                    del self._cached[old]
            self._refs[block] = 1
            kv.table.append(block)
        return True

    def _place(self, table: list[int]) -> int:
        """The free block a sequence holding ``table`` should grow into. Consecutive blocks let the ranks attend
        to a view of the pool instead of copying the blocks out (``raytp.gang.attention.sdpa``), so: the block
        right after its last one if free and caching nothing; else the middle of the longest run of free blocks
        that cache nothing (the first half is room for whichever sequence ends just before it); else the least
        recently freed."""
        nxt = table[-1] + 1 if table else 0
        if 0 < nxt < self.num_blocks and nxt in self._free and self._hash_of[nxt] is None:
            return nxt
        run = self._clean.longest()
        if run is not None:
            start, length = run
            return start if start == 1 else start + length // 2
        return next(iter(self._free))

    def commit(self, kv: KVState, token_ids: list[int], num_computed: int) -> None:
        """Record that the first ``num_computed`` tokens' keys/values are written: full blocks become cacheable."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(kv.hashes), num_computed // bs):
            parent = kv.hashes[-1] if kv.hashes else b""
            h = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            kv.hashes.append(h)
            block = kv.table[i]
            if h not in self._cached:  # else an identical block is already cached: keep that one
                self._cached[h] = block
                self._hash_of[block] = h

    def free(self, kv: KVState) -> None:
        """Release every block of ``kv`` (finished or preempted). Cached prefixes stay reusable until evicted."""
        # last blocks first, so a sequence's tail is evicted before its (more shareable) head
        for block in reversed(kv.table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if self._hash_of[block] is None:
                    self._free.move_to_end(block, last=False)  # holds nothing reusable: hand it out first
                    self._clean.add(block)
        kv.table.clear()
        kv.hashes.clear()

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0
