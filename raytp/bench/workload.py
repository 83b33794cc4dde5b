"""What ``raytp bench`` sends: prompts, their output lengths and their send times. Seeded, so every target
of a ``--compare`` run gets the identical workload."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int] | str  # token ids (exact lengths) or text
    output_len: int
    prompt_len: int | None = None  # known for token-id prompts


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    seed: int) -> list[BenchRequest]:
    """``n`` prompts of random token ids; lengths uniform in [len × (1 - ratio), len × (1 + ratio)]."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    reqs = []
    for _ in range(n):
        prompt = [rng.randrange(10, vocab_size) for _ in range(length(input_len))]
        reqs.append(BenchRequest(prompt, length(output_len), len(prompt)))
    return reqs


def jsonl_requests(path: str | Path, n: int, output_len: int, seed: int) -> list[BenchRequest]:
    """Prompts from a JSONL file, one ``{"prompt": str | [int], "output_len": int?}`` per line; ``n`` of them
    (cycled if the file is shorter, shuffled with ``seed``)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no prompts")
    random.Random(seed).shuffle(rows)
    out = []
    for i in range(n):
        row = rows[i % len(rows)]
        prompt = row["prompt"]
        out.append(BenchRequest(prompt, int(row.get("output_len", output_len)),
                                len(prompt) if isinstance(prompt, list) else None))
    return out


def send_delays(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: all at once for an infinite rate, else a
    Poisson process (exponential gaps) with mean rate ``request_rate`` per second."""
    if request_rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(request_rate)
    return out
