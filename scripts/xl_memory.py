"""Bits per byte on the validation split as the evaluation memory grows (Transformer-XL), beside a plain
decoder whose context is the segment: the table of `experiment=xl_memory`.

    python scripts/xl_memory.py ckpts=[outputs/runs/<xl>/checkpoints/last.ckpt,outputs/runs/<gpt>/checkpoints/last.ckpt]
        [mults=[0,1,2,4]] [streams=8] [max_tokens=16384] [out=xl_memory.json]
    python scripts/compare.py xl_memory xl_memory.json [out=docs/results/xl_memory_cpu]   # table + plot

The validation tokens are cut into `streams` contiguous rows (max_tokens in all) and read segment by segment
(segment = the model's max_seq_len). An XL model is scored with a memory of m x segment for each m in
`mults`; a model without recurrence scores each segment alone (its context is the segment). Also printed:
the loss gain of each extra memory segment (the paper's relative effective context, in a simple form).
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from _args import parse

import torch
import torch.nn.functional as F

from zoo.checkpoint import model_from_checkpoint, read_checkpoint
from zoo.models.transformer_xl import stream_loss

DEFAULTS = {"ckpts": None, "mults": [0, 1, 2, 4], "streams": 8, "max_tokens": 16384, "out": ""}


def _val_tokens(ckpt, streams: int, max_tokens: int):
    import importlib

    run = ckpt.get("zoo_run") or {}
    if "data" not in run:
        raise SystemExit("checkpoint carries no data config (not written by train.py)")
    cfg = {k: v for k, v in run["data"].items() if k != "_target_"}
    module, _, name = run["data"]["_target_"].rpartition(".")
    dm = getattr(importlib.import_module(module), name)(**cfg)
    _, val, bytes_per_token = dm.token_streams()
    per_row = min(len(val) // streams, max_tokens // streams)
    rows = torch.as_tensor(val[: per_row * streams].astype("int64")).view(streams, per_row)
    return rows, bytes_per_token


@torch.no_grad()
def _segments_alone(net, tokens, seg_len):
    total, count = 0.0, 0
    for s in range(0, tokens.shape[1] - 1, seg_len):
        tgt = tokens[:, s + 1: s + seg_len + 1]
        logits = net(tokens[:, s: s + tgt.shape[1]])
        total += float(F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="sum"))
        count += tgt.numel()
    return total / count


def evaluate(args: dict) -> list[dict]:
    rows = []
    for path in args["ckpts"]:
        ckpt = read_checkpoint(path)
        net = model_from_checkpoint(ckpt).eval()
        tokens, bpt = _val_tokens(ckpt, args["streams"], args["max_tokens"])
        seg = net.cfg.max_seq_len
        row = {"ckpt": str(path), "model": net.cfg.name, "params": net.num_params(), "segment": seg}
        if net.cfg.recurrence == "xl":
            for m in args["mults"]:
                row[f"bpb_mem{m}x"] = stream_loss(net, tokens, seg, m * seg) / math.log(2) / bpt
        else:
            row["bpb_mem0x"] = _segments_alone(net, tokens, seg) / math.log(2) / bpt
        rows.append(row)
    return rows


def table(rows: list[dict], mults) -> str:
    head = "| model | params | segment | " + " | ".join(f"bpb mem {m}x" for m in mults) + " |"
    lines = [head, "|" + "---|" * (3 + len(mults))]
    for r in rows:
        cells = [f"{r[f'bpb_mem{m}x']:.4f}" if f"bpb_mem{m}x" in r else "-" for m in mults]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['segment']} | " + " | ".join(cells) + " |")
    for r in rows:
        got = [m for m in mults if f"bpb_mem{m}x" in r]
        gains = [f"{a}x->{b}x: {r[f'bpb_mem{a}x'] - r[f'bpb_mem{b}x']:+.4f}" for a, b in zip(got, got[1:])]
        if gains:
            lines.append(f"\n{r['model']}: bpb gained per extra memory: " + ", ".join(gains))
    return "\n".join(lines)


def main(argv):
    args = parse(argv, DEFAULTS, required=("ckpts",))
    if isinstance(args["ckpts"], str):
        args["ckpts"] = [args["ckpts"]]
    rows = evaluate(args)
    print(table(rows, args["mults"]))
    if args["out"]:
        with open(args["out"], "w") as f:
            json.dump(rows, f, indent=2)
    print(json.dumps(rows))
    return rows


PAPER = ("Dai et al. 2019 (Transformer-XL), abstract and section 4.3: the recurrence lets the model use dependencies "
         "80% longer than RNNs and 450% longer than a vanilla Transformer (its relative effective context length), "
         "gaining from memory several times the training segment; and it evaluates up to 1,800+ times faster than "
         "recomputing the context (scripts/bench_xl.py, docs/transformer_xl.md).")


def compare_main(argv: list[str]) -> list[dict]:
    """`compare.py xl_memory JSON [JSON ...] [out=PATH]`: the rows xl_memory.py wrote (out=...) as a Markdown table
    beside the paper's claim, a CSV, and a plot of bits per byte against the evaluation memory."""
    files = [Path(a) for a in argv if "=" not in a]
    outs = [a.partition("=")[2] for a in argv if a.startswith("out=")]
    if not files or any("=" in a and not a.startswith("out=") for a in argv):
        raise ValueError(f"usage: compare.py xl_memory JSON [JSON ...] [out=PATH]; got {' '.join(argv) or 'nothing'}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)}: no such file (python scripts/xl_memory.py ckpts=[...] out=FILE "
                                "writes one)")
    rows = [r for f in files for r in json.loads(f.read_text())]
    mults = sorted({int(k[len("bpb_mem"):-1]) for r in rows for k in r if k.startswith("bpb_mem")})
    out = Path(outs[-1]) if outs else files[0].with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python scripts/compare.py xl_memory " + " ".join(argv)
    Path(f"{out}.md").write_text(
        f"# Transformer-XL: bits per byte on validation as the evaluation memory grows\n\n```\n{cmd}\n```\n\n"
        f"Memory in multiples of the segment; a model without recurrence reads each segment alone (its context is "
        f"the segment).\n\n{table(rows, mults)}\n\n**Paper.** {PAPER}\n")
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        got = [m for m in mults if f"bpb_mem{m}x" in r]
        label = f"{r['model']} ({r['params'] / 1e6:.2f}M)"
        if len(got) > 1:
            ax.plot(got, [r[f"bpb_mem{m}x"] for m in got], marker="o", label=label)
        else:  # no recurrence: one figure, drawn across the memory axis for comparison
            ax.axhline(r["bpb_mem0x"], linestyle="--", color="grey", label=label + ", context = segment")
    ax.set(xlabel="evaluation memory (x segment)", ylabel="val bits per byte", title="Transformer-XL memory")
    ax.set_xticks(mults)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    plt.close(fig)
    print(table(rows, mults))
    print(f"[compare] {len(rows)} models; wrote {out}.md, {out}.csv, {out}.png", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
