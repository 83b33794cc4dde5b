"""Result files of one ``raytp bench`` run: ``<name>.json``, ``<name>.md`` and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

KEY_METRICS = [("output_throughput", "output tok/s"), ("request_throughput", "req/s"),
               ("median_ttft_ms", "TTFT p50 ms"), ("p99_ttft_ms", "TTFT p99 ms"), ("median_tpot_ms", "TPOT p50 ms"),
               ("p99_tpot_ms", "TPOT p99 ms"), ("median_itl_ms", "ITL p50 ms"), ("median_e2el_ms", "E2E p50 ms")]


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# raytp bench: {cfg['model']}, {cfg['num_prompts']} prompts, request rate {cfg['request_rate']}", "",
             "| target | concurrency | completed | failed | " + " | ".join(label for _, label in KEY_METRICS) + " |",
             "| --- " * (4 + len(KEY_METRICS)) + "|"]
    for name, t in result["targets"].items():
        for run in t["runs"]:
            cells = [f"{run[k]:.2f}" for k, _ in KEY_METRICS]
            lines.append(f"| {name} | {run['max_concurrency']} | {run['completed']} | {run['failed']} | "
                         + " | ".join(cells) + " |")
    ready = {n: t["ready_s"] for n, t in result["targets"].items() if t.get("ready_s") is not None}
    if ready:
        lines += ["", "Ready after (s; a server started here: from its start until it answered, so load and any "
                  "compile): " + ", ".join(f"`{n}` {s:.1f}" for n, s in ready.items())]
    if result.get("ratios"):
        base = next(iter(result["targets"]))
        lines += ["", f"Ratios to `{base}` (same workload, same run):", "",
                  "| target | concurrency | " + " | ".join(label for _, label in KEY_METRICS) + " |",
                  "| --- " * (2 + len(KEY_METRICS)) + "|"]
        for name, per_c in result["ratios"].items():
            for c, q in per_c.items():
                lines.append(f"| {name} | {c} | " + " | ".join(f"{q[k]:.2f}" for k, _ in KEY_METRICS) + " |")
    roof = {n: t["roofline"] for n, t in result["targets"].items() if t.get("roofline")}
    if roof:
        lines += ["", "Roofline (single-stream decode vs memory bandwidth):", "",
                  "| target | TP | decode tok/s | weights (MB) | bandwidth (GB/s) | limit tok/s | efficiency |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in roof.items():
            if "error" in r:
                lines.append(f"| {name} | - | roofline not measured: {r['error']} | | | | |")
                continue
            lines.append(f"| {name} | {r['tp']} | {r['decode_tok_s']:.2f} | {r['weight_bytes'] / 1e6:.0f} | "
                         f"{r['bandwidth_gbps']:.1f} | {r['limit_tok_s']:.2f} | {r['efficiency']:.3f} |")
    return "\n".join(lines) + "\n"


def plots(result: dict, samples: dict, out_dir: Path, stem: str) -> list[str]:
    """Latency distributions per target (first concurrency); throughput vs latency if concurrency was swept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, metric in zip(axes, ("ttft", "tpot", "itl", "e2el")):
        data = [samples[name][0][metric] for name in result["targets"]]
        ax.boxplot(data, whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(data) + 1), list(result["targets"]), rotation=20)
        ax.set_title(f"{metric.upper()} (ms)")
    fig.tight_layout()
    path = out_dir / f"{stem}_latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(str(path))
    if any(len(t["runs"]) > 1 for t in result["targets"].values()):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, t in result["targets"].items():
            xs = [r["output_throughput"] for r in t["runs"]]
            axes[0].plot(xs, [r["median_tpot_ms"] for r in t["runs"]], marker="o", label=name)
            axes[1].plot(xs, [r["p99_ttft_ms"] for r in t["runs"]], marker="o", label=name)
        for ax, title in zip(axes, ("TPOT p50 (ms)", "TTFT p99 (ms)")):
            ax.set_xlabel("output tokens/s")
            ax.set_title(title)
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"{stem}_throughput_latency.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written


def write(result: dict, samples: dict, out_dir: str, stem: str) -> list[str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    return [str(out / f"{stem}.json"), str(out / f"{stem}.md"), *plots(result, samples, out, stem)]
