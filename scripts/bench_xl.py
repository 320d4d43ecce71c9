"""Transformer-XL's cached evaluation vs recomputing the context (Dai et al. 2019, section 4.3 / table 9).

For an attention length A, the vanilla model predicts each token with a fresh forward pass over the A
tokens before it; Transformer-XL predicts a segment of `seg` tokens in one pass over that segment plus a
memory of A - seg cached positions. Reported: seconds per predicted token for both, and the speedup.

    python scripts/bench_xl.py [lengths=[800,1800,3800]] [seg=128] [d_model=256] [n_layers=4] [device=auto]
        [vanilla_reps=2]
"""
from __future__ import annotations

import json
import sys
import time

from _args import parse

import torch

from zoo.models import build_model

DEFAULTS = {"lengths": [800, 1800, 3800], "seg": 128, "d_model": 256, "n_layers": 4, "n_heads": 4,
            "device": "auto", "vanilla_reps": 2, "xl_reps": 3}
PAPER = {800: 363, 1800: 773, 3800: 1874}  # Dai et al. 2019, table 9 (slowdown of the vanilla model)


def _time(fn, reps, device):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


@torch.no_grad()
def bench(args) -> list[dict]:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args["device"] == "auto"
                          else args["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seg = args["seg"]
    rows = []
    for length in args["lengths"]:
        net = build_model("transformer_xl", vocab_size=320, d_model=args["d_model"], n_layers=args["n_layers"],
                          n_heads=args["n_heads"], max_seq_len=seg, mem_len=length - seg)
        net = net.to(device, dtype).eval()
        ctx = torch.randint(0, 256, (1, length), device=device)
        memory = net.trunk.new_memory()
        net(ctx[:, : length - seg], cache=memory)  # fill the memory: A - seg cached positions
        full = memory.layers

        def xl_segment():
            memory.layers = full  # the same memory each repetition
            net(ctx[:, -seg:], cache=memory)

        def vanilla_token():
            net(ctx)  # one token predicted from a fresh pass over its A-token context

        xl = _time(xl_segment, args["xl_reps"], device) / seg
        vanilla = _time(vanilla_token, args["vanilla_reps"], device)
        rows.append({"attn_len": length, "device": device.type, "xl_s_per_token": xl,
                     "vanilla_s_per_token": vanilla, "speedup": vanilla / xl, "paper_speedup": PAPER.get(length)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    bench(parse(sys.argv[1:], DEFAULTS))
