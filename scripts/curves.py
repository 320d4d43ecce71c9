"""Validation loss against training tokens and wall time, for every run below a directory (a sweep).

    python scripts/curves.py outputs/multiruns/2026-11-29_10-00-39            # e.g. experiment=moe_vs_dense
    python scripts/curves.py outputs/multiruns/<time> out=outputs/compare/moe_curves

Reads each run's CSV log (logger=csv: csv/*/metrics.csv) and its .hydra/config.yaml (batch size and sequence
length, for tokens = steps x batch x seq_len x devices). Wall time is train/elapsed_s, logged by every task
(seconds of training since the first step, validation included). Writes <out>.md (one row per evaluation),
<out>.csv and <out>.png (two panels: loss vs tokens, loss vs wall time); out defaults to <dir>/curves.
Complements scripts/compare.py, which tabulates each run's final metrics.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from omegaconf import OmegaConf


def run_label(run: Path, cfg) -> str:
    name = OmegaConf.select(cfg, "model.name", default=None) if cfg is not None else None
    return f"{name}" if name else run.name


def tokens_per_step(cfg) -> int | None:
    if cfg is None:
        return None
    try:
        batch = OmegaConf.select(cfg, "data.batch_size")
        seq = OmegaConf.select(cfg, "data.seq_len")
        devices = OmegaConf.select(cfg, "trainer.devices", default=1)
        nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
        return int(batch) * int(seq) * (devices if isinstance(devices, int) else 1) * int(nodes)
    except Exception:  # an interpolation this script cannot resolve (hydra:...): steps only
        return None


def read_run(run: Path) -> list[dict]:
    logs = sorted(run.glob("csv/*/metrics.csv"))
    if not logs:
        return []
    cfg_path = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_path) if cfg_path.exists() else None
    per_step = tokens_per_step(cfg)
    rows = list(csv.DictReader(logs[-1].open()))
    elapsed = {}  # step -> the latest train/elapsed_s logged at or before it
    last = None
    for r in sorted(rows, key=lambda r: int(r["step"])):
        if r.get("train/elapsed_s"):
            last = float(r["train/elapsed_s"])
        elapsed[int(r["step"])] = last
    out = []
    for r in rows:
        if r.get("val/loss"):
            step = int(r["step"]) + 1  # the CSV's step is the index of the last optimizer step taken
            out.append({"run": run_label(run, cfg), "step": step, "tokens": step * per_step if per_step else None,
                        "elapsed_s": elapsed.get(int(r["step"])), "val/loss": float(r["val/loss"])})
    return out


def main(argv: list[str]) -> Path:
    paths = [a for a in argv if "=" not in a]
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(opts) - {"out"})
    if len(paths) != 1 or unknown:
        raise SystemExit("usage: curves.py DIR [out=PATH]")
    root = Path(paths[0])
    out = Path(opts.get("out", root / "curves"))
    runs = sorted({p.parents[2] for p in root.rglob("csv/*/metrics.csv")})
    points = [p for run in runs for p in read_run(run)]
    if not points:
        raise SystemExit(f"no run below {root} has a CSV log with val/loss (train with logger=csv)")
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["run", "step", "tokens", "elapsed_s", "val/loss"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(points)
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(p[c]) for c in cols) + " |" for p in points]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))

    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for label in dict.fromkeys(p["run"] for p in points):
        mine = [p for p in points if p["run"] == label]
        x = [p["tokens"] if p["tokens"] is not None else p["step"] for p in mine]
        axes[0].plot(x, [p["val/loss"] for p in mine], marker="o", label=label)
        timed = [p for p in mine if p["elapsed_s"] is not None]
        axes[1].plot([p["elapsed_s"] for p in timed], [p["val/loss"] for p in timed], marker="o", label=label)
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("wall time (s)")
    for ax in axes:
        ax.set_ylabel("val/loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    print(f"[curves] {len(runs)} runs; wrote {out.with_suffix('.md')}, {out.with_suffix('.csv')}, "
          f"{out.with_suffix('.png')}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
