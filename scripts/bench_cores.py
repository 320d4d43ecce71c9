"""Attention cores alone: forward+backward time and peak memory against sequence length.

    python scripts/bench_cores.py                                   # CPU, small lengths
    python scripts/bench_cores.py device=cuda dtype=bf16 heads=16 head_dim=128 seq_lens=4096,8192,16384

Rows, for each length:
- `sdpa full` / `sdpa causal`: dense exact attention, torch SDPA with the fastest backend that runs
  (cuDNN, then flash, then efficient, then math; the one used is in the table);
- each core of `cores=` (sparse and linear) through its own forward (impl=auto: flex_attention on CUDA, the blocked
  kernel elsewhere; performer/linear: the Triton kernels on CUDA, the torch scan elsewhere, and
  `performer_torch`/`linear_torch` the torch scan everywhere);
- on CUDA, `flex <core>`: torch's flex_attention called directly with the core's mask (the core's whole
  pattern as one mask_mod, block mask built once outside the timed step), the yardstick the issue names.
Time is the median over `repeats` windows of `window` back-to-back fwd+bwd steps (per step), after `warmup`
steps: as in training, the host queues a step while the GPU runs the previous one (window=1: a sync after
every step, which adds the host's launch time to every GPU-bound row); peak memory is max_memory_allocated on CUDA
(inputs, outputs, gradients, workspaces) and the profiler's allocator peak on CPU.
With profile=true each row is then profiled over 3 more steps into <out>_profiles.txt: kernels launched per
step, the summed kernel time per step beside the row's measured time (much less means the host's launches, not
the GPU, set the pace), and the top kernels (on a CPU: the top operators).
Options: seq_lens batch heads head_dim device dtype repeats warmup window cores out globals profile.
"""
from __future__ import annotations

import csv
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from scripts._args import parse  # noqa: E402
from scripts.bench import cpu_peak_bytes, device_name, is_oom, median_step_ms  # noqa: E402
from zoo.blocks import build_core  # noqa: E402

CORES = {  # name -> (core, causal, options): the settings of the H200 target
    "sliding_window": ("sliding_window", True, {"window": 512}),
    "longformer": ("longformer", False, {"window": 512}),  # the paper's separate global q/k/v projections
    # global tokens reuse the local q/k/v: exactly flex's longformer mask, nothing else (its `flex longformer` row)
    "longformer_shared": ("longformer", False, {"window": 512, "global_projections": "shared"}),
    "bigbird": ("bigbird", False, {"block_size": 64, "num_random_blocks": 3, "num_global_blocks": 1}),
    "sparse_strided": ("sparse_strided", True, {"stride": 128}),
    "performer": ("performer", True, {"nb_features": 256}),  # causal FAVOR+: Triton kernels on CUDA, torch scan on CPU
    "linear": ("linear", True, {}),
    "performer_torch": ("performer", True, {"nb_features": 256, "backend": "chunked"}),  # the torch scan everywhere
    "linear_torch": ("linear", True, {"backend": "chunked"}),
}
FLEX_MASKS = ("sliding_window", "longformer", "bigbird", "sparse_strided")  # cores with a mask to hand to flex
DEFAULTS = {"seq_lens": "256,512,1024,2048", "batch": 1, "heads": 4, "head_dim": 64,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": "fp32", "repeats": 5, "warmup": 2,
            "cores": ",".join(FLEX_MASKS), "out": "outputs/bench/cores", "globals": 16, "window": 5,
            "profile": "false"}
SDPA_ORDER = ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]


class _Cfg:  # what a core's setup(cfg) reads
    def __init__(self, heads, head_dim):
        self.n_heads, self.head_dim, self.d_model, self.bias = heads, head_dim, heads * head_dim, True


def measure(step, device: str, repeats: int, warmup: int, window: int = 1) -> tuple[float, float]:
    """(median ms, peak MiB) of a fwd+bwd step: the CUDA allocator's peak, or the CPU profiler's."""
    ms = median_step_ms(step, device, repeats, warmup, window)
    return ms, (torch.cuda.max_memory_allocated() if device == "cuda" else cpu_peak_bytes(step)) / 2**20


def profile_row(step, label: str, n: int, ms: float, device: str, path: Path, steps: int = 3) -> str:
    """Kernels per step, their summed time per step against the measured `ms`, and the top kernels (operators
    on a CPU) of `steps` more steps, appended to `path`; returns the summary line."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / steps / 1e3
        line = (f"{label} @ {n}: {len(kernels) / steps:.0f} kernels per step, {busy:.3f} ms of kernel time per step "
                f"against {ms:.3f} ms measured ({busy / ms:.0%} busy)")
        sort = "self_device_time_total"
    else:
        line = f"{label} @ {n}: {ms:.3f} ms measured (CPU: operators below)"
        sort = "self_cpu_time_total"
    with open(path, "a") as f:
        f.write(f"## {line}\n\n{prof.key_averages().table(sort_by=sort, row_limit=10)}\n\n")
    return line


def inputs(o, n, dtype, device):
    shape = (o["batch"], o["heads"], n, o["head_dim"])
    return [torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]


def fwd_bwd(fn, qkv):
    def step():
        for t in qkv:
            t.grad = None
        fn(*qkv).sum().backward()
    return step


def sdpa_fn(causal: bool, device: str, dtype: torch.dtype | None = None):
    """The fastest SDPA backend that accepts the call (in `dtype`: cuDNN and flash take no float32), and its name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = SDPA_ORDER if device == "cuda" else ["FLASH_ATTENTION", "MATH"]
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    probe = [torch.randn(1, 2, 128, 64, device=device, dtype=dtype) for _ in range(3)]
    for name in order:
        backend = getattr(SDPBackend, name)
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(*probe, is_causal=causal)
        except RuntimeError:
            continue

        def fn(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn, name.split("_")[0].lower()
    raise RuntimeError("no SDPA backend runs here")


def core_fn(name: str, o, n: int, device: str):
    core_name, causal, opts = CORES[name]
    core = build_core(core_name, causal=causal, **opts).to(device)
    ctx = None
    core.setup(_Cfg(o["heads"], o["head_dim"]))
    core.to(device)
    if core_name == "longformer":
        gm = torch.zeros(o["batch"], n, dtype=torch.bool, device=device)
        gm[:, :: max(n // o["globals"], 1)] = True  # `globals` evenly spaced global tokens
        hidden = torch.randn(o["batch"], n, o["heads"] * o["head_dim"], device=device)
        ctx = {"global_attention_mask": gm, "hidden": hidden}

    def fn(q, k, v):
        with autocast(o, device):
            return core(q, k, v, context=ctx)
    return fn, core, ctx


def autocast(o, device: str):
    """The precision context of a training step, the same for a core and its flex yardstick."""
    dtype = torch.bfloat16 if o["dtype"] == "bf16" else torch.float32
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


def flex_same_mask(name: str, core, ctx, n: int, device: str, heads: int, o):
    """flex_attention with the core's whole pattern as one mask (block mask built once, outside timing), under
    the same autocast as the core's row."""
    from kernels.sparse_attention import flex_attention, make_block_mask
    from kernels.sparse_patterns import strided_predicate, window_predicate
    if name == "sliding_window":
        pred = window_predicate(core.window, True)
        mask_mod = lambda b, h, q, k: pred(q, k)  # noqa: E731
    elif name == "sparse_strided":
        pred = strided_predicate(core.stride, core.pattern, core.summary)
        mask_mod = lambda b, h, q, k: pred(q, k)  # noqa: E731
    elif name == "longformer":
        band, gm = window_predicate(core.window, False), ctx["global_attention_mask"]
        mask_mod = lambda b, h, q, k: band(q, k) | gm[b, k] | gm[b, q]  # noqa: E731
    else:
        bs = core.block_size
        table = core.table(-(-n // bs), heads).to(device)
        mask_mod = lambda b, h, q, k: table[h, q // bs, k // bs]  # noqa: E731
    bm = make_block_mask(mask_mod, None, heads if name == "bigbird" else None, n, n, device)

    def fn(q, k, v):
        with autocast(o, device):
            return flex_attention(q, k, v, bm)
    return fn


def main(argv: list[str]) -> list[dict]:
    o = parse(argv, DEFAULTS)
    lens = [int(x) for x in str(o["seq_lens"]).split(",")]
    names = [c for c in str(o["cores"]).split(",") if c]
    bad = [c for c in names if c not in CORES]
    if bad:
        raise SystemExit(f"cores={bad}; valid choices: {', '.join(CORES)}")
    dev = o["device"]
    dtype = torch.bfloat16 if o["dtype"] == "bf16" else torch.float32
    if str(o["profile"]) not in ("true", "false"):
        raise SystemExit(f"profile={o['profile']!r}; valid choices: true, false")
    profiles = Path(f"{o['out']}_profiles.txt") if str(o["profile"]) == "true" else None
    if profiles:
        profiles.parent.mkdir(parents=True, exist_ok=True)
        profiles.unlink(missing_ok=True)
    rows = []
    for n in lens:
        plan = []
        for causal in (False, True):
            fn, backend = sdpa_fn(causal, dev, dtype)
            plan.append((f"sdpa {'causal' if causal else 'full'} ({backend})", lambda fn=fn: fn))
        for name in names:
            plan.append((name, lambda name=name: core_fn(name, o, n, dev)[0]))
            if dev == "cuda" and name in FLEX_MASKS:
                def flex_plan(name=name):
                    _, core, ctx = core_fn(name, o, n, dev)
                    return flex_same_mask(name, core, ctx, n, dev, o["heads"], o)
                plan.append((f"flex {name}", flex_plan))
        for label, make in plan:
            try:
                if dev == "cuda":
                    # each row alone in dynamo's cache: compiled flex graphs are looked up in order, and a row
                    # behind other rows' entries would pay their guard checks on every call
                    torch._dynamo.reset()
                qkv = inputs(o, n, dtype, dev)
                window = o["window"] if dev == "cuda" else 1  # a CPU step is synchronous anyway
                step = fwd_bwd(make(), qkv)
                ms, mib = measure(step, dev, o["repeats"], o["warmup"], window)
                if profiles:
                    print("  " + profile_row(step, label, n, ms, dev, profiles), flush=True)
            except Exception as e:  # noqa: BLE001 — an OOM (or a backend refusing a shape) is a result
                if not is_oom(e) and dev == "cpu":
                    raise
                ms, mib = ("OOM" if is_oom(e) else f"error: {type(e).__name__}"), float("nan")
            finally:
                qkv = None
                if dev == "cuda":
                    torch.cuda.empty_cache()
            rows.append({"impl": label, "seq_len": n, "ms fwd+bwd": ms, "peak MiB": mib})
            print(f"{label:36s} {n:6d} {ms if isinstance(ms, str) else f'{ms:9.3f}'} ms  {mib:9.1f} MiB", flush=True)
        write(rows, o, argv, dev)  # after every length: a run cut short still leaves its table
    return rows


def write(rows, o, argv, dev):
    out = Path(o["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["impl", "seq_len", "ms fwd+bwd", "peak MiB"]
    rows = sorted(rows, key=lambda r: r["seq_len"])  # seq_lens may come in any order (the longest first)
    fmt = lambda x: x if isinstance(x, str) else (f"{x:.3g}" if x < 1000 else f"{x:.0f}")  # noqa: E731
    table = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                      + ["| " + " | ".join(str(r[c]) if isinstance(r[c], int) else fmt(r[c]) for c in cols) + " |"
                         for r in rows])
    cmd = "python scripts/bench_cores.py " + " ".join(argv)
    out.with_suffix(".md").write_text(
        f"# Attention cores: forward+backward vs sequence length\n\n```\n{cmd}\n```\n\nMachine: {device_name(dev)}; "
        f"torch {torch.__version__}; {platform.platform()}; batch {o['batch']}, {o['heads']} heads, head dim "
        f"{o['head_dim']}, {o['dtype']}; median of {o['repeats']} windows of {o['window']} back-to-back steps after "
        f"{o['warmup']} warm-up steps.\n\n{table}\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        (w := csv.DictWriter(f, fieldnames=cols)).writeheader()
        w.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["impl"] for r in rows):
        ok = [r for r in rows if r["impl"] == label and not isinstance(r["ms fwd+bwd"], str)]
        for ax, key in zip(axes, ("ms fwd+bwd", "peak MiB")):
            ax.plot([r["seq_len"] for r in ok], [r[key] for r in ok], marker="o", label=label,
                    linestyle="--" if label.startswith(("sdpa", "flex")) else "-")
    for ax, key in zip(axes, ("ms fwd+bwd", "peak MiB")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=key)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{device_name(dev)}, {o['heads']} heads x {o['head_dim']}, {o['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
