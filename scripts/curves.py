"""Validation loss (or another logged metric) against training tokens and wall time, for every run below a
directory (a sweep).

    python scripts/curves.py outputs/multiruns/2026-11-29_10-00-39            # e.g. experiment=moe_vs_dense
    python scripts/curves.py outputs/multiruns/<time> out=outputs/compare/moe_curves
    python scripts/curves.py outputs/multiruns/<time> metric=val/acc          # e.g. experiment=lra_listops

Reads each run's CSV log (logger=csv: csv/*/metrics.csv) and its .hydra/config.yaml (batch size and sequence
length, for tokens = steps x batch x seq_len x devices). A resumed run (ckpt_path=auto) writes a new
csv/version_N: the versions are joined in order, each later one replacing the earlier ones' points from its
first training or validation step on (a version with only test metrics replaces none), and its wall time
continued from where it resumed. Wall time is train/elapsed_s, logged by every
task (seconds of training since the first step, validation included). Runs are labelled by model.name, or,
where a sweep's runs share it, by the overrides in their directory names that differ between them. Writes
<out>.md (one row per evaluation), <out>.csv and <out>.png (two panels: metric vs tokens, metric vs wall time);
out defaults to <dir>/curves. Complements scripts/compare.py, which tabulates each run's final metrics.
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


def _version(log: Path) -> int:
    tail = log.parent.name.rpartition("_")[2]
    return int(tail) if tail.isdigit() else -1


def read_run(run: Path, metric: str = "val/loss", label: str | None = None) -> list[dict]:
    logs = sorted(run.glob("csv/*/metrics.csv"), key=_version)
    if not logs:
        return []
    cfg_path = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_path) if cfg_path.exists() else None
    per_step = tokens_per_step(cfg)
    label = label or run_label(run, cfg)
    out: list[dict] = []
    for log in logs:
        rows = sorted(csv.DictReader(log.open()), key=lambda r: int(r["step"]))
        if not rows:
            continue
        # what this version re-ran replaces the earlier log's; a version that only scored the test split (resumed
        # at the last step) re-ran nothing
        ran = [r for r in rows if any(v for k, v in r.items() if k.startswith(("train/", "val/")))]
        if ran:
            out = [p for p in out if p["step"] < int(ran[0]["step"]) + 1]
        offset = next((p["elapsed_s"] for p in reversed(out) if p["elapsed_s"] is not None), 0.0)
        last = None
        for r in rows:
            if r.get("train/elapsed_s"):
                last = float(r["train/elapsed_s"]) + offset
            if r.get(metric):
                step = int(r["step"]) + 1  # the CSV's step is the index of the last optimizer step taken
                out.append({"run": label, "step": step, "tokens": step * per_step if per_step else None,
                            "elapsed_s": last, metric: float(r[metric])})
    return out


def labels(runs: list[Path]) -> list[str | None]:
    """None (model.name) where the names differ; else each run's directory overrides not shared by all."""
    names = []
    for run in runs:
        cfg_path = run / ".hydra" / "config.yaml"
        names.append(run_label(run, OmegaConf.load(cfg_path) if cfg_path.exists() else None))
    if len(set(names)) == len(names):
        return [None] * len(runs)
    parts = [run.name.split("_", 1)[-1].split(",") for run in runs]  # "3_attention=full,experiment=x"
    common = set.intersection(*(set(p) for p in parts))
    return [",".join(x for x in p if x not in common) or run.name for p, run in zip(parts, runs)]


def main(argv: list[str]) -> Path:
    paths = [a for a in argv if "=" not in a]
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(opts) - {"out", "metric"})
    if len(paths) != 1 or unknown:
        raise SystemExit("usage: curves.py DIR [out=PATH] [metric=val/loss]")
    root = Path(paths[0])
    out = Path(opts.get("out", root / "curves"))
    metric = opts.get("metric", "val/loss")
    runs = sorted({p.parents[2] for p in root.rglob("csv/*/metrics.csv")})
    points = [p for run, label in zip(runs, labels(runs)) for p in read_run(run, metric, label)]
    if not points:
        raise SystemExit(f"no run below {root} has a CSV log with {metric} (train with logger=csv)")
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["run", "step", "tokens", "elapsed_s", metric]
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
        x = [p["tokens"] if all(q["tokens"] is not None for q in points) else p["step"] for p in mine]
        axes[0].plot(x, [p[metric] for p in mine], marker="o", label=label)
        timed = [p for p in mine if p["elapsed_s"] is not None]
        axes[1].plot([p["elapsed_s"] for p in timed], [p[metric] for p in timed], marker="o", label=label)
    axes[0].set_xlabel("training tokens" if all(p["tokens"] is not None for p in points) else "training steps")
    axes[1].set_xlabel("wall time (s)")
    for ax in axes:
        ax.set_ylabel(metric)
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
