"""The tables of docs/QUALITY.md's "Refit on your data" from simulate.py's results (means over seeds).

    .venv/bin/python docs/reports/refit-r1/summarize.py docs/reports/refit-r1/results.json [STRATEGY ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any

import numpy as np

DEFAULT_COLUMNS = ["default", "saft", "anchored(pseudo=0.25)", "anchored(pseudo=1)", "anchored(kept-as-benign=1)",
                   "labelled(16)", "partial(100,16)", "partial(200,16)", "partial(300,16)", "replace (labelled upload alone)"]


def mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def main() -> None:
    results = json.loads(open(sys.argv[1]).read())
    columns = sys.argv[2:] or DEFAULT_COLUMNS
    cells: dict[str, dict[str, dict[str, list[Any]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for entry in results:
        for name, m in entry["strategies"].items():
            if "error" in m:
                continue
            for key in ("auroc", "drop_share", "fpr", "recall"):
                cells[entry["user_set"]][name][key].append(m[key])
            cells[entry["user_set"]][name]["held"].append(bool(m["guard"]))
    print("| user set | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    gains: dict[str, list[float]] = defaultdict(list)
    for user_set, by in cells.items():
        row = []
        base = mean(by["default"]["auroc"])
        for col in columns:
            if col not in by:
                row.append("–")
                continue
            a, d = mean(by[col]["auroc"]), mean(by[col]["drop_share"])
            held = sum(by[col]["held"])
            mark = f" ⊘{held}" if held and col != "default" else ""
            row.append(f"{'–' if a is None else f'{a:.3f}'} / {100 * d:.1f}%{mark}")
            if a is not None and base is not None:
                gains[col].append(a - base)
        print(f"| {user_set} | " + " | ".join(row) + " |")
    print()
    print("| strategy | mean ΔAUROC vs default | worst ΔAUROC | user sets |")
    print("|---|---|---|---|")
    for col in columns:
        if gains[col]:
            print(f"| {col} | {np.mean(gains[col]):+.3f} | {min(gains[col]):+.3f} | {len(gains[col])} |")


if __name__ == "__main__":
    main()
