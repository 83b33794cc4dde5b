"""Where benchmark results go: benchmarks/results/<name>.json and <name>.md (the Markdown is also printed)."""

import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write(name: str, data: dict, markdown_lines: list[str]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=2)
    md = "\n".join(markdown_lines) + "\n"
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
