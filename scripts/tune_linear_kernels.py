"""Launch settings of the linear-attention Triton kernels: (num_warps, num_stages) of each kernel chosen by
coordinate descent on the causal Performer's fwd+bwd at 16K tokens (batch 1, 16 heads x 128, bf16), then the
performer / linear rows of scripts/bench_cores.py measured with the chosen settings in the same process.

    python scripts/tune_linear_kernels.py out=docs/results/bench_linear_h200      # CUDA only, ~2 minutes

It prints the chosen `LAUNCH` table; kernels/linear_attention_triton.py's LAUNCH holds the last choice. A step
is timed over windows of 5 back-to-back steps (scripts/bench.median_step_ms); a setting replaces the current
one only when it is more than 1% faster.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scripts._args import parse  # noqa: E402
from scripts.bench import median_step_ms  # noqa: E402
from scripts.bench_cores import core_fn, fwd_bwd, inputs, main as bench  # noqa: E402

SHAPE = {"batch": 1, "heads": 16, "head_dim": 128, "dtype": "bf16", "globals": 16}
TUNED = ("fwd_states", "fwd_out", "bwd_states", "bwd_chunk", "favor_fwd", "favor_bwd")  # bwd_prep: tiny
CHOICES = [(w, s) for w in (4, 8) for s in (1, 2)]


def step_ms(name: str, n: int) -> float:
    fn, _, _ = core_fn(name, SHAPE, n, "cuda")
    return median_step_ms(fwd_bwd(fn, inputs(SHAPE, n, torch.bfloat16, "cuda")), "cuda", 7, 3, 5)


def tune(n: int = 16384) -> dict:
    import kernels.linear_attention_triton as lat
    print("start", lat.LAUNCH, "performer", round(step_ms("performer", n), 3), flush=True)
    for key in TUNED:
        best, best_ms = lat.LAUNCH[key], None
        for choice in CHOICES:
            lat.LAUNCH[key] = choice
            try:
                ms = step_ms("performer", n)
            except Exception as e:  # noqa: BLE001 — a setting out of shared memory is skipped
                print(key, choice, type(e).__name__, flush=True)
                continue
            if best_ms is None or ms < best_ms * 0.99:
                best, best_ms = choice, ms
        lat.LAUNCH[key] = best
        print(key, "->", best, round(best_ms, 3), flush=True)
    print("LAUNCH =", json.dumps(lat.LAUNCH), flush=True)
    return lat.LAUNCH


if __name__ == "__main__":
    o = parse(sys.argv[1:], {"out": "outputs/bench/linear_tuned"})
    if not torch.cuda.is_available():
        raise SystemExit("scripts/tune_linear_kernels.py tunes CUDA kernels: no CUDA device here")
    tune()
    bench(["device=cuda", "dtype=bf16", "heads=16", "head_dim=128", "seq_lens=16384,4096", "cores=performer,linear",
           "repeats=10", "warmup=3", f"out={o['out']}"])
