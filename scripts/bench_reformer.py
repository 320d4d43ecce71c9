"""Reformer costs: LSH attention (1, 2, 4, 8 hashes) against full attention, and the reversible stack's memory
against depth.

    python scripts/bench_reformer.py                                        # CPU, small lengths
    python scripts/bench_reformer.py device=cuda seq_lens=1024,2048,4096,8192,16384 depths=1,2,4,8,16

Part `attention` (rows per length): `sdpa causal` (dense exact attention, torch SDPA) and `lsh-k` (the lsh core,
causal, chunks of `chunk`, k hash rounds): median forward+backward time and peak memory (max_memory_allocated
on CUDA, the profiler's allocator peak on CPU).
Part `depth`: model=reformer (reversible) and the same model with reversible=false, full causal attention so
that only the stack differs, at each depth: peak memory of one training step, and the activation bytes autograd
keeps for backward (parameters excluded); `peak_minus_grads` is the peak less the parameter gradients (which
grow with depth for any stack). The reversible stack's activations stay flat; the plain stack's grow with depth.
Options: seq_lens hashes chunk batch heads head_dim device repeats warmup depths depth_seq d_model parts out.
Writes <out>_attention.{csv,md,png} and <out>_depth.{csv,md,png}.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scripts._args import parse  # noqa: E402
from scripts.bench import is_oom  # noqa: E402
from scripts.bench_cores import fwd_bwd, inputs, measure, sdpa_fn  # noqa: E402
from zoo.blocks import build_core  # noqa: E402

DEFAULTS = {"seq_lens": "1024,2048,4096", "hashes": "1,2,4,8", "chunk": 64, "batch": 1, "heads": 4, "head_dim": 64,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "repeats": 3, "warmup": 1,
            "depths": "1,2,4,8", "depth_seq": 1024, "d_model": 256, "parts": "attention,depth",
            "out": "outputs/bench/reformer", "dtype": "fp32"}


def _ints(v) -> list[int]:
    return [int(x) for x in str(v).split(",")]


def bench_attention(o) -> list[dict]:
    rows = []
    dev = o["device"]
    for n in _ints(o["seq_lens"]):
        qkv = inputs(o, n, torch.float32, dev)
        fns = [("sdpa causal", sdpa_fn(True, dev, torch.float32)[0])]
        for k in _ints(o["hashes"]):
            core = build_core("lsh", causal=True, n_hashes=k, chunk_length=o["chunk"]).to(dev)
            fns.append((f"lsh-{k}", lambda q, kk, v, core=core: core(q, q, v)))
        for name, fn in fns:
            try:
                ms, mib = measure(fwd_bwd(fn, qkv), dev, o["repeats"], o["warmup"])
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                ms = mib = float("nan")
            rows.append({"seq_len": n, "attention": name, "ms": round(ms, 2), "peak_mib": round(mib, 1)})
            print(rows[-1], flush=True)
    return rows


def saved_activation_bytes(model, x) -> int:
    """Bytes autograd keeps for the backward pass of one training step, parameters excluded: what grows with
    depth for a plain stack and stays flat for a reversible one."""
    params = {p.data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t):
        if t.data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()  # outside the hooks: the reversible backward's own recomputation is not "kept"
    return total[0]


def bench_depth(o) -> list[dict]:
    import zoo
    rows = []
    dev, n = o["device"], o["depth_seq"]
    for depth in _ints(o["depths"]):
        for reversible in (True, False):
            model = zoo.build_model("reformer", vocab_size=320, d_model=o["d_model"], n_layers=depth, n_heads=4,
                                    max_seq_len=n, reversible=reversible, attention="causal", shared_qk=False,
                                    ffn_chunks=1).to(dev).train()
            x = torch.randint(0, 320, (o["batch"], n), device=dev)

            def step(model=model, x=x):
                model.zero_grad(set_to_none=True)
                model(x).float().logsumexp(-1).mean().backward()
            try:
                ms, mib = measure(step, dev, o["repeats"], o["warmup"])
                saved = saved_activation_bytes(model, x) / 2**20
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                ms = mib = saved = float("nan")
            # the step's peak includes every parameter's gradient, which grows with depth for any stack
            grads = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            rows.append({"depth": depth, "stack": "reversible" if reversible else "plain", "ms": round(ms, 1),
                         "peak_mib": round(mib, 1), "peak_minus_grads_mib": round(mib - grads, 1),
                         "saved_activations_mib": round(saved, 1)})
            print(rows[-1], flush=True)
            del model
    return rows


def write(rows: list[dict], out: Path, x: str, series: str, ys: tuple[str, ...], title: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = list(rows[0])
    md = [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 4))
    for ax, y in zip(axes, ys):
        for s in dict.fromkeys(r[series] for r in rows):
            pts = [(r[x], r[y]) for r in rows if r[series] == s]
            ax.plot(*zip(*pts), marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(out.with_suffix(".png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    print("\n".join(md))


def main(argv: list[str]) -> None:
    o = parse(argv, DEFAULTS)
    out = Path(o["out"])
    dev_name = torch.cuda.get_device_name() if o["device"] == "cuda" else "CPU"
    parts = str(o["parts"]).split(",")
    if "attention" in parts:
        rows = bench_attention(o)
        write(rows, out.with_name(out.name + "_attention"), "seq_len", "attention", ("ms", "peak_mib"),
              f"LSH vs full causal attention, fwd+bwd, {o['heads']} heads x {o['head_dim']}, chunk {o['chunk']}, "
              f"{dev_name}")
    if "depth" in parts:
        rows = bench_depth(o)
        write(rows, out.with_name(out.name + "_depth"), "depth", "stack",
              ("peak_mib", "peak_minus_grads_mib", "saved_activations_mib"),
              f"reversible vs plain stack, one training step, length {o['depth_seq']}, d_model {o['d_model']}, "
              f"{dev_name}")


if __name__ == "__main__":
    main(sys.argv[1:])
