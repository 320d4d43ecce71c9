"""One table (and a bar plot) from the runs of a sweep.

    python scripts/compare.py outputs/multiruns/2026-11-29_07-14-10
    python scripts/compare.py outputs/runs out=outputs/compare/all_runs

Reads every metrics.json below the directory (train.py writes one per finished run: model,
attention, overrides, params, global_step and the logged metrics such as val/loss, val/ppl,
val/bpb, val/acc, train/tokens_per_s). Writes <out>.md (one row per run, the union of the metrics
as columns), <out>.csv and <out>.png (bars of val/loss, and of val/acc where runs have it), and
prints the Markdown table. out defaults to <dir>/compare.

Two more modes, by their first word (a directory named like them is reached as ./results, ./mqar):

    python scripts/compare.py results [out=docs/results.md]      # the results page: every comparison
    python scripts/compare.py mqar DIR [DIR ...] [out=PATH]       # MQAR: pivot core x pairs per width + plot
    python scripts/compare.py xl_memory JSON [out=PATH]           # Transformer-XL: bpb vs evaluation memory + plot

(scripts/results_page.py documents both.)
"""
from __future__ import annotations

import csv
import json
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXED = ["run", "model", "attention", "overrides"]
PLOTTED = ["val/loss", "val/acc"]


def parse_args(argv: list[str]) -> tuple[Path, Path]:
    root, out = None, None
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "out":
            out = value
        elif not sep and root is None:
            root = arg
        else:
            raise ValueError(f"unexpected argument {arg!r}; usage: compare.py DIR [out=PATH]")
    if root is None:
        raise ValueError("no directory given; usage: compare.py DIR [out=PATH]")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    return root, Path(out) if out else root / "compare"


def _natural(path: Path) -> list:
    # job directories are numbered 0_..., 1_..., 10_...: 10 comes after 9, not after 1
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def load_runs(root: Path) -> list[dict]:
    files = sorted(root.rglob("metrics.json"), key=_natural)
    if not files:
        raise FileNotFoundError(f"no metrics.json below {root}: train.py writes one when a run finishes "
                                "(a run that crashed or is still going has none)")
    runs = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{f} does not hold a JSON object")
        rel = f.parent.relative_to(root).as_posix()
        runs.append({"run": rel if rel != "." else root.name, **data})
    return runs


def metric_columns(runs: list[dict]) -> list[str]:
    """The union of the runs' metrics: sizes first, then validation, then training, then the rest."""
    keys = dict.fromkeys(k for r in runs for k in r if k not in FIXED)
    order = {"params": 0, "global_step": 1}

    def rank(k):
        return (order.get(k, 2 if k.startswith("val/") else 3 if k.startswith("train/") else 4), k)

    return sorted(keys, key=rank)


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return " ".join(shlex.quote(str(v)) for v in value)
    return str(value)


def markdown(runs: list[dict], columns: list[str]) -> str:
    def row(values):
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    lines = [row(columns), "|" + "---|" * len(columns)]
    lines += [row([cell(r.get(c)) for c in columns]) for r in runs]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> bool:
    shown = [m for m in PLOTTED if any(isinstance(r.get(m), (int, float)) for r in runs)]
    if not shown:
        return False
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(max(5.0, 0.6 * len(runs) + 2) * len(shown), 4.5), squeeze=False)
    for ax, m in zip(axes[0], shown):
        have = [r for r in runs if isinstance(r.get(m), (int, float))]
        bars = ax.bar(range(len(have)), [r[m] for r in have], color="tab:blue" if m == "val/loss" else "tab:green")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(have)), [r["run"] for r in have], rotation=35, ha="right", fontsize=7)
        ax.set(ylabel=m, title=m + (" (lower is better)" if m == "val/loss" else " (higher is better)"))
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


MODES = ("results", "mqar", "xl_memory")


def main(argv: list[str]):
    if argv and argv[0] == "xl_memory":  # xl_memory.py runs as a script: its imports resolve from scripts/
        sys.path.insert(0, str(ROOT / "scripts"))
        import xl_memory

        return xl_memory.compare_main(argv[1:])
    if argv and argv[0] in MODES:
        from scripts import results_page

        return results_page.results_main(argv[1:]) if argv[0] == "results" else results_page.mqar_main(argv[1:])
    root, out = parse_args(argv)
    runs = load_runs(root)
    columns = FIXED + metric_columns(runs)
    table = markdown(runs, columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python scripts/compare.py " + " ".join(shlex.quote(a) for a in argv)
    Path(f"{out}.md").write_text(f"# Runs below {root}\n\n```\n{cmd}\n```\n\n{table}\n")
    with open(f"{out}.csv", "w", newline="") as f:
        (w := csv.writer(f)).writerow(columns)
        for r in runs:
            w.writerow([cell(r[c]) if isinstance(r.get(c), (list, tuple)) else r.get(c, "") for c in columns])
    plotted = plot(runs, Path(f"{out}.png"))
    print(table)
    print(f"[compare] {len(runs)} runs; wrote {out}.md, {out}.csv" + (f", {out}.png" if plotted else
          " (no val/loss or val/acc to plot)"), file=sys.stderr)
    return runs


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"compare.py: error: {e}")
