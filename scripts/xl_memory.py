"""Bits per byte on the validation split as the evaluation memory grows (Transformer-XL), beside a plain
decoder whose context is the segment: the table of `experiment=xl_memory`.

    python scripts/xl_memory.py ckpts=[outputs/runs/<xl>/checkpoints/last.ckpt,outputs/runs/<gpt>/checkpoints/last.ckpt]
        [mults=[0,1,2,4]] [streams=8] [max_tokens=16384] [out=xl_memory.json]

The validation tokens are cut into `streams` contiguous rows (max_tokens in all) and read segment by segment
(segment = the model's max_seq_len). An XL model is scored with a memory of m x segment for each m in
`mults`; a model without recurrence scores each segment alone (its context is the segment). Also printed:
the loss gain of each extra memory segment (the paper's relative effective context, in a simple form).
"""
from __future__ import annotations

import json
import math
import sys

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


if __name__ == "__main__":
    main(sys.argv[1:])
