"""Launch settings of the linear-attention Triton kernels: (num_warps, num_stages) of each kernel chosen by
coordinate descent on the causal Performer's fwd+bwd at 16K tokens (batch 1, 16 heads x 128, bf16), then the
performer / linear rows of scripts/bench_cores.py measured with the chosen settings in the same process.

    python scripts/tune_linear_kernels.py out=docs/results/bench_linear_h200      # CUDA only, ~2 minutes
    python scripts/tune_linear_kernels.py compare=true                            # the variants below instead
    python scripts/tune_linear_kernels.py other=<file>   # and another kernels file's performer / linear
    python scripts/tune_linear_kernels.py other=<file> variants=false rounds=7   # only the two files

It prints the chosen `LAUNCH` table; kernels/linear_attention_triton.py's LAUNCH holds the last choice. A step
is timed over windows of 5 back-to-back steps (scripts/bench.median_step_ms); a setting replaces the current
one only when it is more than 1% faster. `compare=true` skips the launch sweep and times the causal Performer
at the module's settings and at each of VARIANTS (other chunk and segment sizes, other FAVOR+ and chunk-kernel
tiles, other backward-chunk launches, the settings before 2026-11-30, the features and the attention as two
autograd nodes instead of the training path's one), in
`rounds` interleaved passes so that drift hits all alike, then runs the benchmark rows at the module's settings.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from contextlib import contextmanager
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


VARIANTS = {"chunk 32": {"CHUNK": 32}, "chunk 128": {"CHUNK": 128}, "segment 16": {"SEGMENT": 16},
            "segment 64": {"SEGMENT": 64}, "favor rows 32": {"FAVOR_ROWS": 32}, "favor rows 128": {"FAVOR_ROWS": 128},
            "favor features 32": {"FAVOR_FEATURES": 32}, "favor features 128": {"FAVOR_FEATURES": 128},
            # one tile of all 256 features: each logit computed once
            "favor features 256": {"FAVOR_FEATURES": 256},
            "favor rows 32, features 256": {"FAVOR_ROWS": 32, "FAVOR_FEATURES": 256},
            # the chunk kernels' feature tiles (a smaller tile holds fewer registers, in more steps)
            "out tile 32": {"OUT_TILE": 32}, "out tile 128": {"OUT_TILE": 128},
            "bwd tile 64, 8 warps": {"BWD_TILE": 64, "LAUNCH": {"bwd_chunk": (8, 1)}},
            "bwd tile 32, 8 warps": {"LAUNCH": {"bwd_chunk": (8, 1)}},
            "bwd tile 32, 2 stages": {"LAUNCH": {"bwd_chunk": (4, 2)}},
            # the settings before 2026-11-30's compare
            "segment 16, bwd tile 64, 8 warps": {"SEGMENT": 16, "BWD_TILE": 64, "LAUNCH": {"bwd_chunk": (8, 1)}},
            # the features and the attention as two autograd nodes (the path with padded keys or a running state)
            "two autograd nodes": {}}
TWO_NODES = "two autograd nodes"


@contextmanager
def path(two: bool, module=None):
    """The causal Performer's training step as features, then attention (two nodes) instead of the fused one;
    with `module`, through that copy of kernels/linear_attention_triton.py (an older version, say)."""
    import kernels.linear_attention as la
    from zoo.blocks.linear_cores import PerformerCore, _LinearCore
    fused, triton_module = PerformerCore.attend, la._triton
    if two:
        PerformerCore.attend = _LinearCore.attend
    if module is not None:
        la._triton = lambda: module
    try:
        yield
    finally:
        PerformerCore.attend, la._triton = fused, triton_module


def load_kernels(file: str):
    """Another copy of the kernels module, e.g. `git show <commit>:kernels/linear_attention_triton.py > f`."""
    spec = importlib.util.spec_from_file_location("linear_attention_triton_other", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(n: int = 16384, rounds: int = 3, other: str | None = None, variants: bool = True) -> dict:
    """Median step ms of the module's settings ("current") and of each variant, over interleaved rounds; with
    `other`, also the causal Performer and linear attention through that file's kernels (the Performer as one
    node if the file has the fused path, else two), and linear attention through the current ones."""
    import kernels.linear_attention_triton as lat
    keys = sorted({key for change in VARIANTS.values() for key in change})
    base = {key: getattr(lat, key) for key in keys}
    runs = [(name, "performer", change, name == TWO_NODES, None)
            for name, change in [("current", {}), *(VARIANTS.items() if variants else [])]]
    if other:
        module = load_kernels(other)
        two = not hasattr(module, "causal_favor_attention")  # an older file: features, then attention
        runs += [(f"{core} ({other})", core, {}, two, module) for core in ("performer", "linear")]
        runs += [("linear (current)", "linear", {}, False, None)]
    times: dict[str, list] = {run[0]: [] for run in runs}
    for _ in range(rounds):
        for name, core, change, two, module in runs:
            for key, value in {**base, **change}.items():  # a LAUNCH change names only the kernels it retunes
                setattr(lat, key, {**base[key], **value} if isinstance(value, dict) else value)
            try:
                with path(two, module):
                    times[name].append(step_ms(core, n))
            except Exception as e:  # noqa: BLE001 — a tile too large for shared memory or registers is reported
                times[name].append(float("nan"))
                print(name, type(e).__name__, str(e)[:200], flush=True)
    for key, value in base.items():
        setattr(lat, key, value)
    result = {name: round(sorted(t)[len(t) // 2], 3) for name, t in times.items()}
    print("fwd+bwd ms at", n, "tokens:", json.dumps(result), flush=True)
    return result


def main(argv: list[str]) -> None:
    o = parse(argv, {"out": "outputs/bench/linear_tuned", "compare": False, "other": "", "variants": True,
                     "rounds": 3})
    for key in ("compare", "variants"):
        if not isinstance(o[key], bool):
            raise SystemExit(f"{key}={o[key]!r}; valid choices: true, false")
    if not isinstance(o["rounds"], int) or isinstance(o["rounds"], bool) or o["rounds"] < 1:
        raise SystemExit(f"rounds={o['rounds']!r} must be a positive integer")
    if o["other"] and not Path(o["other"]).is_file():
        raise SystemExit(f"other={o['other']!r}: not a file (a copy of kernels/linear_attention_triton.py)")
    if not torch.cuda.is_available():
        raise SystemExit("scripts/tune_linear_kernels.py tunes CUDA kernels: no CUDA device here")
    if o["compare"] or o["other"]:
        compare(rounds=o["rounds"], other=o["other"] or None, variants=o["variants"])
    else:
        tune()
    bench(["device=cuda", "dtype=bf16", "heads=16", "head_dim=128", "seq_lens=16384,4096", "cores=performer,linear",
           "repeats=10", "warmup=3", f"out={o['out']}"])


if __name__ == "__main__":
    main(sys.argv[1:])
