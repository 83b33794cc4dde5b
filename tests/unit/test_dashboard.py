"""The shipped Grafana dashboard queries exactly the metrics raytp exports, under their exported names."""

import json
import re
from pathlib import Path

from raytp.serve.metrics import NAMES

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "raytp-dashboard.json"
SUFFIX = {"histogram": "_bucket", "counter": "_total", "gauge": ""}


def test_dashboard_covers_every_metric_with_its_exported_name():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set(re.findall(r"\bray_raytp_[a-z0-9_]+", " ".join(exprs)))
    exported = {f"ray_{name}{SUFFIX[kind]}" for name, kind in NAMES.items()}
    assert used <= exported, f"dashboard queries metrics raytp does not export: {used - exported}"
    assert exported <= used, f"metrics without a panel: {exported - used}"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
