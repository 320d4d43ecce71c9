"""Sample from a trained decoder with its KV cache.

    python scripts/generate.py ckpt=outputs/runs/<run>/checkpoints/last.ckpt prompt="def " max_new_tokens=200
    (temperature=0 is greedy; top_k=40; seed=0; device=auto|cpu|cuda; use_cache=false to recompute;
     kv_cache=dynamic|static|cuda_graph: see zoo/models/decoding.py)
"""
from __future__ import annotations

import sys

from _args import parse

import torch

import zoo
from data.tokenizers import tokenizer_from_state
from zoo.checkpoint import model_from_checkpoint, read_checkpoint

DEFAULTS = {"ckpt": None, "prompt": "", "max_new_tokens": 100, "temperature": 0.8, "top_k": 40, "seed": 0,
            "device": "auto", "use_cache": True, "kv_cache": "dynamic"}


def generate(args: dict) -> str:
    ckpt = read_checkpoint(args["ckpt"])
    model = model_from_checkpoint(ckpt)
    tok_state = ckpt.get("zoo_run", {}).get("tokenizer")
    if tok_state is None:
        raise zoo.CheckpointError(f"checkpoint {args['ckpt']} carries no tokenizer (not written by train.py)")
    tok = tokenizer_from_state(tok_state)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args["device"] == "auto" else args["device"]
    model = model.to(device).eval()
    ids = tok.encode(args["prompt"]) or [tok.eos_id]
    g = torch.Generator(device=device).manual_seed(int(args["seed"]))
    out = model.generate(torch.tensor([ids], device=device), int(args["max_new_tokens"]), float(args["temperature"]),
                         args["top_k"], generator=g, use_cache=bool(args["use_cache"]),
                         kv_cache=args["kv_cache"])
    return tok.decode(out[0].tolist())


def main(argv: list[str]) -> str:
    text = generate(parse(argv, DEFAULTS, required=("ckpt",)))
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
