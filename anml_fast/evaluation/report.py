"""Evaluation results as a Markdown table and a plot of accuracy against the number of classes."""
from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_path, write_text


def _counts(all_results: list[dict]) -> list[int]:
    return sorted({int(n) for r in all_results for n in r["class_counts"]})


def table(all_results: list[dict]) -> str:
    """One column per system: meta-test test / train accuracy, mean ± std over the final runs."""
    head = "| classes | " + " | ".join(f"{r['system']} test | {r['system']} train | lr" for r in all_results) + " |"
    sep = "| ---: |" + " :---: | :---: | ---: |" * len(all_results)
    lines = [head, sep]
    for n in _counts(all_results):
        cells = []
        for r in all_results:
            rec = r["class_counts"].get(str(n))
            if rec is None:
                cells += ["-", "-", "-"]
                continue
            f = rec["final"]
            cells += [f"{f['test_mean']:.3f} ± {f['test_std']:.3f}",
                      f"{f['train_mean']:.3f} ± {f['train_std']:.3f}", f"{f['lr']:g}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    # systems folded from several evaluations (anml-fast compare) say their own spread
    runs = {len(rec["final"]["test_acc"]) for r in all_results if not r.get("members")
            for rec in r["class_counts"].values()}
    note = (f"\nMean ± standard deviation over {', '.join(map(str, sorted(runs)))} final runs per class count.\n"
            if runs else "\n")
    return "\n".join(lines) + "\n" + note


def write_table(path: Path, all_results: list[dict]) -> None:
    write_text(path, table(all_results))


def write_plot(path: Path, all_results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one legend entry per system (its colour) and one per line style: with seven systems, an
    # entry per curve buried the curves; the legend sits beside the axes for the same reason
    fig, ax = plt.subplots(figsize=(8.4, 4.4), dpi=120)
    for i, r in enumerate(all_results):
        ns = sorted(int(n) for n in r["class_counts"])
        if not ns:
            continue
        color = f"C{i}"
        for split, style in (("test", "-"), ("train", "--")):
            mean = [r["class_counts"][str(n)]["final"][f"{split}_mean"] for n in ns]
            std = [r["class_counts"][str(n)]["final"][f"{split}_std"] for n in ns]
            ax.plot(ns, mean, style, marker="o", ms=3, color=color,
                    label=r["system"] if split == "test" else None)
            ax.fill_between(ns, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.15, lw=0)
    ax.set_xlabel("classes learned sequentially")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.plot([], [], "-", color="black", label="meta-test test")
    ax.plot([], [], "--", color="black", label="meta-test train")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.set_title("Omniglot continual learning (meta-test)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
