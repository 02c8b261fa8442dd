"""Several evaluations side by side, and seeds of one system folded into mean and spread.

`anml-fast compare` reads results.json files (or the folders `evaluate` wrote), names each system
(its own name, or one given with --as, so that runs of several meta-training seeds share a name),
and writes one table and one plot. A name held by several evaluations becomes one system whose
accuracy per class count is the mean over them of their final-run means, with the standard
deviation over them: the spread across seeds, not across runs.
"""
from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from ..errors import AnmlFastError
from .protocol import RESULTS_JSON


def read_results(path: str | Path) -> list[dict]:
    """The systems in one results.json (or an evaluation folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_JSON
    try:
        systems = json.loads(p.read_text())["results"]
        for s in systems:
            s["system"], s["class_counts"]  # noqa: B018 - the fields every evaluation has
    except FileNotFoundError:
        raise AnmlFastError(f"{p}: no such results file (give results.json files or evaluation folders)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise AnmlFastError(f"{p}: not an anml-fast results file ({e})") from None
    return systems


def fold(named: list[tuple[str, dict]]) -> list[dict]:
    """Systems in first-seen order; those sharing a name become one (mean and spread over them)."""
    groups: dict[str, list[dict]] = {}
    for name, system in named:
        groups.setdefault(name, []).append(system)
    out = []
    for name, members in groups.items():
        if len(members) == 1:
            out.append({**members[0], "system": name})
            continue
        counts = sorted({int(n) for m in members for n in m["class_counts"]})
        merged = {}
        for n in counts:
            finals = [m["class_counts"][str(n)]["final"] for m in members if str(n) in m["class_counts"]]
            test = [f["test_mean"] for f in finals]
            train = [f["train_mean"] for f in finals]
            merged[str(n)] = {"classes": n, "final": {
                "lr": Counter(f["lr"] for f in finals).most_common(1)[0][0],
                "lrs": [f["lr"] for f in finals], "test_acc": test, "train_acc": train,
                "test_mean": statistics.fmean(test), "train_mean": statistics.fmean(train),
                "test_std": statistics.pstdev(test), "train_std": statistics.pstdev(train)}}
        out.append({"system": name, "members": len(members), "sources": [m.get("source") for m in members],
                    "class_counts": merged})
    return out


def note(systems: list[dict]) -> str:
    folded = [f"{s['system']} ({s['members']} evaluations)" for s in systems if s.get("members")]
    if not folded:
        return ""
    return ("Folded systems, mean ± standard deviation over their evaluations (e.g. meta-training "
            f"seeds), each the mean of its final runs: {', '.join(folded)}.\n")
