"""The rows of one GPU session (benchmarks/gpu_session.sh), from that run's own files only.

    python benchmarks/gpu_summary.py --run /tmp/gpu_run.XXXXXX --out $OUT [--final]

Reads the per-step files the session wrote into ``--run`` (a fresh temp dir of that run: nothing under
benchmarks/results/ is ever read) and writes two files into ``--out``:
  gpu_session.json  exactly the issue's keys; null for a row this run did not measure:
      commit                 the HEAD gpu_prepare.sh recorded (.carry/COMMIT), with "-dirty" when the tree that
                             travelled was not that commit: uncommitted files then, or files changed since
                             (the session's sha256 check against .carry/MANIFEST); null without .carry/COMMIT
      device                 the GPU's name (torch), or "cpu" for the CPU rehearsal
      versions               {torch, triton, transformers} as imported there
      kernel_equal           false if a kernel test failed or the kernel benchmark found a case unequal; true if the
                             kernel tests ran and passed (and no benchmark case was unequal); else null
      c64_vs_generate_batch  raytp / transformers generate_batch output tok/s, 64 concurrent (step c64)
      c64_ttft_p50_s         raytp's TTFT p50 in that run
      b1_2k_roofline         batch-1 decode at a 2k context / bandwidth roofline (weights + K/V bytes); on an
                             accelerator only when its steps ran as graphs (decode_mode not eager)
      app_http_vs_engine     {"1": r, "64": r}: the whole app over HTTP / the engine in process, output tok/s
      async_vs_sync_c64      raytp output tok/s with async scheduling (step c64) / without (step c64_sync)
  gpu_steps.json    every step's status (ok, failed, timeout, skipped), seconds and limit, the tree check, the
                    full versions, test counts and each step's raw results, for reading the rows above.
Pure standard library: it runs in a second, after every step, so a run killed mid-way still leaves its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

KEYS = ("commit", "device", "versions", "kernel_equal", "c64_vs_generate_batch", "c64_ttft_p50_s",
        "b1_2k_roofline", "app_http_vs_engine", "async_vs_sync_c64")


def load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def steps(run: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    try:
        lines = open(os.path.join(run, "steps.tsv")).read().splitlines()
    except OSError:
        return out
    for line in lines:
        name, status, rc, seconds, limit = (line.split("\t") + [""] * 5)[:5]
        out[name] = {"status": status, "exit": int(rc) if rc else None, "seconds": int(seconds or 0),
                     "limit_s": int(limit) if limit.lstrip("-").isdigit() else None}
    return out


def junit(path: str) -> dict | None:
    """Counts of a pytest --junitxml file: tests, failures, errors, skipped, passed."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def equality_flags(data, path: str = "") -> dict[str, bool]:
    """Every boolean under a key naming equality (``equal``, ``matches``, ``*_equal``) in the kernel benchmark's
    JSON, by its path: the benchmark's own verdict per case, whatever its layout."""
    found: dict[str, bool] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(value, bool) and ("equal" in str(key).lower() or "match" in str(key).lower()):
                found[where] = value
            else:
                found.update(equality_flags(value, where))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.update(equality_flags(value, f"{path}[{i}]"))
    return found


def ok(result: dict | None, key: str):
    """``result[key]`` when that target ran without error, else None."""
    part = (result or {}).get(key)
    return part if isinstance(part, dict) and "error" not in part else None


def commit(run: str) -> tuple[str | None, dict]:
    info = load(os.path.join(run, "commit.json"))
    check_rc = None
    try:
        check_rc = int(open(os.path.join(run, "tree_check.rc")).read().strip())
    except (OSError, ValueError):
        pass
    changed = []
    try:
        changed = [ln for ln in open(os.path.join(run, "tree_check.txt")).read().splitlines() if ln.strip()]
    except OSError:
        pass
    if info is None and os.path.isdir(".git"):  # no .carry/COMMIT: a git checkout run in place names its HEAD
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                   timeout=10).stdout.split("\n")
            info = {"head": head, "dirty": [d for d in dirty if d.strip()], "source": "git in the tree"}
        except (OSError, subprocess.SubprocessError):
            pass
    if info is None:
        return None, {"error": "no .carry/COMMIT and no git checkout: the measured commit is unknown"}
    detail = {**info, "tree_check_exit": check_rc, "tree_changed_since_prepare": changed}
    clean = not info.get("dirty") and check_rc in (0, None) and not changed
    return info["head"] + ("" if clean else "-dirty"), detail


def summarize(run: str) -> tuple[dict, dict]:
    versions = load(os.path.join(run, "versions.json")) or {}
    status = steps(run)
    tests = {name: junit(os.path.join(run, f"{name}.xml")) for name in ("kernel_tests", "device_tests")}
    kernel = load(os.path.join(run, "kernel.json"))
    c64, c64_sync = load(os.path.join(run, "c64.json")), load(os.path.join(run, "c64_sync.json"))
    b1 = load(os.path.join(run, "b1_2k.json"))
    app = load(os.path.join(run, "app", "app.json"))

    # kernel equality: the kernel tests on the device, and the benchmark's per-case verdicts
    flags = equality_flags(kernel) if kernel else {}
    kt, kt_status = tests["kernel_tests"], status.get("kernel_tests", {}).get("status")
    kernel_equal = None
    if (kt and kt["failures"]) or (flags and not all(flags.values())):
        kernel_equal = False
    elif kt and kt_status == "ok" and kt["passed"] > 0 and kt["errors"] == 0:
        kernel_equal = True

    c64_raytp, c64_hf = ok(c64, "raytp"), ok(c64, "hf")
    at_64 = c64 is not None and c64.get("concurrency") == 64
    c64_ratio = c64.get("raytp_over_hf_tok_s") if at_64 and c64_raytp and c64_hf else None
    ttft = round(c64_raytp["ttft_p50_s"], 3) if at_64 and c64_raytp and c64_raytp.get("ttft_p50_s") else None
    sync_raytp = ok(c64_sync, "raytp")
    async_vs_sync = None
    if at_64 and c64_raytp and sync_raytp and c64_sync.get("concurrency") == 64 and sync_raytp.get("output_tok_s"):
        async_vs_sync = round(c64_raytp["output_tok_s"] / sync_raytp["output_tok_s"], 3)
    decode = ok(b1, "decode")
    roofline = None  # the row is batch 1 at a 2k context with graphs: an accelerator's eager fallback is not it
    if decode and decode.get("decode_context", 0) >= 2048 and (
            versions.get("device") == "cpu" or decode.get("decode_mode", "eager") != "eager"):
        roofline = decode.get("roofline_efficiency_b1")

    app_ratio = None
    if app and {"http", "engine"} <= set(app.get("targets", {})):
        per = {name: {str(r["max_concurrency"]): r for r in app["targets"][name]["runs"]}
               for name in ("http", "engine")}

        def ratio(c: str):
            h, e = per["http"].get(c), per["engine"].get(c)
            if not h or not e or h.get("failed") or e.get("failed") or not e.get("output_throughput"):
                return None
            return round(h["output_throughput"] / e["output_throughput"], 3)

        app_ratio = {"1": ratio("1"), "64": ratio("64")}

    head, commit_detail = commit(run)
    rows = {"commit": head, "device": versions.get("device"),
            "versions": {k: versions.get(k) for k in ("torch", "triton", "transformers")} if versions else None,
            "kernel_equal": kernel_equal, "c64_vs_generate_batch": c64_ratio, "c64_ttft_p50_s": ttft,
            "b1_2k_roofline": roofline, "app_http_vs_engine": app_ratio, "async_vs_sync_c64": async_vs_sync}
    assert tuple(rows) == KEYS
    detail = {"commit": commit_detail, "versions": versions, "steps": status, "tests": tests,
              "kernel_equality_flags": flags,
              "results": {"kernel": kernel, "c64": c64, "b1_2k": b1, "c64_sync": c64_sync, "app": app}}
    return rows, detail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the session's per-step directory (this run only)")
    ap.add_argument("--out", required=True, help="where gpu_session.json and gpu_steps.json go")
    ap.add_argument("--final", action="store_true", help="also print the steps and the rows")
    args = ap.parse_args()
    rows, detail = summarize(args.run)
    os.makedirs(args.out, exist_ok=True)
    for name, data in (("gpu_session.json", rows), ("gpu_steps.json", detail)):
        tmp = os.path.join(args.out, f".{name}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, os.path.join(args.out, name))  # a kill mid-write leaves the previous summary whole
    if args.final:
        print("| step | status | seconds | limit s |\n| --- | --- | --- | --- |")
        for name, s in detail["steps"].items():
            print(f"| {name} | {s['status']} | {s['seconds']} | {s['limit_s']} |")
        for name, counts in detail["tests"].items():
            if counts:
                print(f"{name}: {counts}")
        for case, row in ((detail["results"]["kernel"] or {}).get("cases") or {}).items():
            print(f"kernel {case}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in row.items() if k.endswith(("_us", "_equal", "segments"))))
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
