"""The Reformer paper's table 2 from the runs of `python train.py -m experiment=reformer_copy`: each trained
model (full attention, LSH-1/2/4) evaluated on the duplication task with full attention and LSH-1/2/4/8.

    python scripts/reformer_copy.py outputs/multiruns/<time>
    python scripts/reformer_copy.py outputs/multiruns/<time> out=docs/results/reformer_copy n_eval=512 lsh_chunk=16
    python scripts/reformer_copy.py DIR device=cpu                    # evaluates on the GPU when there is one

Reads every last.ckpt below the directory. "Full" evaluation is the lsh core with one chunk covering the
sequence (exact shared-QK attention with the self-mask rule); LSH-k uses the LSH arms' chunk length with k
hash rounds (`core.eval_n_hashes`). Writes <out>.md (ours beside the paper's matrix), <out>.csv and <out>.png
(the two heat-maps); out defaults to <dir>/reformer_copy.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVALS = ("full", "lsh8", "lsh4", "lsh2", "lsh1")
TRAINS = ("full", "lsh4", "lsh2", "lsh1")
# Kitaev et al. 2020, table 2 (length 1024, 1 layer, d_model 256): rows trained with, columns evaluated with
PAPER = {"full": (100.0, 94.8, 92.5, 76.9, 52.5), "lsh4": (0.8, 100.0, 99.9, 99.4, 91.9),
         "lsh2": (0.8, 100.0, 99.9, 97.1, 86.8), "lsh1": (0.8, 99.9, 99.6, 94.8, 77.9)}


def set_eval(model, setting: str, lsh_chunk: int) -> None:
    """Switch every lsh core of `model` to full attention or to LSH with k rounds (evaluation only)."""
    for block in model.trunk.blocks:
        core = block.attn.core
        if type(core).name != "lsh":
            raise ValueError(f"model {model.cfg.name!r} has attention.core={type(core).name!r}; this table needs 'lsh'")
        if setting == "full":
            core.chunk_length, core.eval_n_hashes = model.cfg.max_seq_len, 1
        else:
            core.chunk_length, core.eval_n_hashes = lsh_chunk, int(setting[3:])


@torch.no_grad()
def accuracy(model, input_ids, labels, batch_size: int = 64) -> float:
    model.eval()
    hit = total = 0
    for i in range(0, len(input_ids), batch_size):
        x, y = input_ids[i:i + batch_size], labels[i:i + batch_size]
        mask = y != -100
        pred = model(x).argmax(-1)
        hit += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    return 100.0 * hit / total


def accuracy_matrix(models: dict, input_ids, labels, lsh_chunk: int, evals=EVALS) -> dict:
    """{trained-with: {evaluated-with: accuracy %}}; restores each core's own chunk length afterwards."""
    out = {}
    for name, model in models.items():
        saved = [(b.attn.core.chunk_length, b.attn.core.eval_n_hashes) for b in model.trunk.blocks]
        try:
            out[name] = {}
            for setting in evals:
                set_eval(model, setting, lsh_chunk)
                out[name][setting] = accuracy(model, input_ids, labels)
        finally:
            for b, (c, h) in zip(model.trunk.blocks, saved):
                b.attn.core.chunk_length, b.attn.core.eval_n_hashes = c, h
    return out


def _arm(cfg) -> str:
    if cfg.attention["chunk_length"] >= cfg.max_seq_len:
        return "full"
    return f"lsh{cfg.attention['n_hashes']}"


def _table(matrix: dict, title: str) -> list[str]:
    lines = [f"**{title}**", "", "| trained with \\ evaluated with | " + " | ".join(EVALS) + " |",
             "|---|" + "---|" * len(EVALS)]
    for t in TRAINS:
        if t in matrix:
            lines.append(f"| {t} | " + " | ".join(f"{matrix[t][e]:.1f}" for e in EVALS) + " |")
    return lines


def _plot(ours: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, m) in zip(axes, (("this repo", ours), ("Kitaev et al. 2020, table 2", PAPER))):
        rows = [t for t in TRAINS if t in m]
        data = [[m[t][e] if isinstance(m[t], dict) else m[t][i] for i, e in enumerate(EVALS)] for t in rows]
        im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis")
        ax.set_xticks(range(len(EVALS)), EVALS)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("evaluated with")
        ax.set_ylabel("trained with")
        ax.set_title(title)
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k")
    fig.colorbar(im, ax=axes, label="accuracy on the second copy (%)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str]) -> dict:
    from data.duplication import generate_duplication
    from zoo import load_checkpoint

    args = {"out": None, "n_eval": "512", "vocab_size": "128", "seed": "1234", "lsh_chunk": None,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}
    root = None
    for a in argv:
        key, sep, value = a.partition("=")
        if sep and key in args:
            args[key] = value
        elif root is None:  # a sweep's run directories have '=' in their names
            root = Path(a)
        else:
            raise ValueError(f"unexpected argument {a!r}; usage: reformer_copy.py DIR [out=PATH] [n_eval=N] "
                             "[vocab_size=V] [seed=S] [lsh_chunk=L] [device=cpu|cuda]")
    if root is None:
        raise ValueError("no directory given; usage: reformer_copy.py DIR [out=PATH]")
    models, paths = {}, {}
    for ckpt in sorted(root.rglob("last.ckpt")):
        model, cfg = load_checkpoint(ckpt)
        arm = _arm(cfg)
        if arm in models:  # two runs of one arm (e.g. a rerun in the same folder): which one is meant is unknown
            raise ValueError(f"two checkpoints of the {arm!r} arm below {root}: {paths[arm]} and {ckpt}; "
                             "point reformer_copy.py at a folder with one run per arm")
        models[arm], paths[arm] = model.to(args["device"]), ckpt
    if not models:
        raise ValueError(f"no last.ckpt below {root}: run `python train.py -m experiment=reformer_copy` first")
    lsh = [m for k, m in models.items() if k != "full"]
    lsh_chunk = int(args["lsh_chunk"] or (lsh[0].cfg.attention["chunk_length"] if lsh else 64))
    seq_len = next(iter(models.values())).cfg.max_seq_len
    x, y = generate_duplication(int(args["n_eval"]), vocab_size=int(args["vocab_size"]), seq_len=seq_len,
                                seed=int(args["seed"]), split="val")
    x, y = x.to(args["device"]), y.to(args["device"])
    matrix = accuracy_matrix(models, x, y, lsh_chunk)
    out = Path(args["out"]) if args["out"] else root / "reformer_copy"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trained_with", *EVALS])
        for t in TRAINS:
            if t in matrix:
                w.writerow([t, *(f"{matrix[t][e]:.2f}" for e in EVALS)])
    md = (_table(matrix, f"This repo: length {seq_len}, LSH chunk {lsh_chunk}, {len(x)} validation sequences")
          + [""] + _table({k: dict(zip(EVALS, v)) for k, v in PAPER.items()}, "Kitaev et al. 2020, table 2 (length 1024)"))
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    _plot(matrix, out.with_suffix(".png"))
    print("\n".join(md))
    return matrix


if __name__ == "__main__":
    main(sys.argv[1:])
