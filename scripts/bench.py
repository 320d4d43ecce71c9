"""Training-step cost against sequence length: forward+backward time and peak memory.

    python scripts/bench.py model=gpt seq_lens=128,256,512,1024 batch=4 out=outputs/bench/cpu_gpt
    python scripts/bench.py model=gpt model.n_layers=2 device=cuda dtype=bf16 seq_lens=1024,2048,4096
    python scripts/bench.py model=gpt model=gpt model.n_kv_heads=1 seq_lens=256,512   # two configs
    python scripts/bench.py configs="gpt; gpt attention=causal model.n_kv_heads=1" device=cuda

Configs: every `model=NAME` starts a new config; the `attention=NAME` and `model.FIELD=VALUE`
arguments after it belong to it (before any `model=`, to an implicit `model=gpt`). `configs=` takes
the same thing as one string, configs separated by `;`, where a config may start with a bare name.
Each config is labelled by its own arguments in the outputs. Models with a position table
(learned, sinusoidal) get model.max_seq_len raised to the longest length.

Options (defaults): seq_lens=256,512,1024 batch=4 device=cpu|cuda (cuda when available)
dtype=fp32|bf16 (bf16 = autocast, as the trainer's bf16-mixed) repeats=5 warmup=2 compile=false
out=outputs/bench/bench. Writes <out>.md, <out>.csv and <out>.png and prints the Markdown table.
A length that runs out of memory is recorded as OOM and the run goes on. Peak memory is
max_memory_allocated on CUDA; on CPU, weights + input + the step's peak of tensor allocations as
the profiler sees them (cpu_peak_bytes). On a shared CPU, timings move with the load (in the table).
"""
from __future__ import annotations

import csv
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import zoo  # noqa: E402
from zoo.models import registry  # noqa: E402

OPTIONS = {"seq_lens": "256,512,1024", "batch": "4", "device": "cuda" if torch.cuda.is_available() else "cpu",
           "dtype": "fp32", "repeats": "5", "warmup": "2", "compile": "false", "out": "outputs/bench/bench"}
COLUMNS = ["config", "seq_len", "ms/step", "tokens/s", "TFLOP/s", "peak MiB", "device", "torch"]


def parse_args(argv: list[str]) -> tuple[dict, list[list[str]]]:
    opts, configs = dict(OPTIONS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"argument {arg!r} is not key=value")
        if key in OPTIONS:
            opts[key] = value
        elif key == "configs":
            configs += [shlex.split(c) for c in value.split(";") if c.strip()]
        elif key == "model":
            configs.append([arg])
        elif key == "attention" or key.startswith("model."):
            if not configs:
                configs.append(["model=gpt"])
            configs[-1].append(arg)
        else:
            raise ValueError(f"unknown argument {key!r}; valid: model, attention, model.FIELD, configs, "
                             + ", ".join(OPTIONS))
    for key, choices in (("dtype", ("fp32", "bf16")), ("device", ("cpu", "cuda"))):
        if opts[key] not in choices:
            raise ValueError(f"{key}={opts[key]!r}; valid choices: {', '.join(choices)}")
    if opts["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch.cuda.is_available() is False")
    try:
        for key in ("batch", "repeats", "warmup"):
            opts[key] = int(opts[key])
        opts["seq_lens"] = sorted(int(n) for n in str(opts["seq_lens"]).split(",") if n.strip())
    except ValueError as e:
        raise ValueError(f"batch, repeats, warmup take an integer and seq_lens a comma list of them ({e})") from None
    if min(opts["batch"], opts["repeats"], *opts["seq_lens"] or [0]) < 1:
        raise ValueError("batch, repeats and every seq_len must be >= 1")
    opts["compile"] = str(opts["compile"]).lower() in ("true", "1", "yes")
    return opts, configs or [["model=gpt"]]


def build_config(tokens: list[str], max_len: int):
    """One config's arguments -> (label, ModelConfig), the position table long enough for max_len."""
    name, attention, dots = "gpt", None, []
    for i, tok in enumerate(tokens):
        key, sep, value = tok.partition("=")
        if not sep and i == 0:
            name = tok
        elif key == "model":
            name = value
        elif key == "attention":
            attention = value
        elif key.startswith("model."):
            dots.append(tok)
        else:
            raise ValueError(f"{tok!r} in config {' '.join(tokens)!r}: expected NAME, model=, attention= or model.FIELD=")
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist(dots)).get("model", {}) if dots else {}
    if attention is not None:
        if isinstance(overrides.get("attention"), dict):  # attention=NAME plus model.attention.X=...: merge
            if attention not in registry.available("attention"):
                raise ValueError(f"attention={attention!r} is unknown; valid choices: "
                                 + ", ".join(registry.available("attention")))
            base = yaml.safe_load((registry.CONF_DIR / "attention" / f"{attention}.yaml").read_text()) or {}
            overrides["attention"] = {**base, **overrides["attention"]}
        else:
            overrides["attention"] = attention
    cfg = zoo.model_config(name, **dict(overrides))
    if cfg.position in ("learned", "sinusoidal") and cfg.max_seq_len < max_len:
        cfg = zoo.model_config(name, **{**overrides, "max_seq_len": max_len})
    label = " ".join(t[len("model="):] if t.startswith("model=") else t for t in tokens)
    return label, cfg


def is_oom(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)) or any(
        s in str(err).lower() for s in ("out of memory", "can't allocate memory", "not enough memory"))


def cpu_peak_bytes(step) -> float:
    """Peak bytes of tensors live during one step, on the CPU allocator.

    The profiler (profile_memory) records every CPU-allocator allocation and free made while it runs,
    with the allocator's running total of those allocations; its maximum minus its value before the
    first one is the step's peak of new tensor storage (activations, gradients, temporaries). Memory
    outside the allocator (oneDNN scratch, the Python heap) is not seen. Returns NaN if this torch
    lacks the event tree."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto otherwise logs every start and stop to stderr
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        from torch._C._profiler import _EventType
        roots, events = prof.profiler.kineto_results.experimental_event_tree(), []
    except (ImportError, AttributeError):
        return float("nan")
    while roots:
        e = roots.pop()
        roots.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append(e)
    if not events:
        return 0.0
    first = min(events, key=lambda e: e.start_time_ns).extra_fields  # its total before = the level at start
    return max(e.extra_fields.total_allocated for e in events) - (first.total_allocated - first.alloc_size)


def median_step_ms(step, device: str, repeats: int, warmup: int, window: int = 1) -> float:
    """Median milliseconds per call of `step`, over `repeats` timed windows of `window` back-to-back calls,
    after `warmup` calls. On CUDA timed with events, and the peak memory counter reset before the timed calls
    (read torch.cuda.max_memory_allocated after). window > 1 is how training runs: the host queues the next
    step while the GPU still runs this one, so a step costs max(host, GPU) time, not their sum (a window of
    1 synchronises after every call and charges the host's launch time to a GPU-bound step)."""
    for _ in range(warmup):
        step()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(window):
                step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / window)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(window):
                step()
            times.append((time.perf_counter() - t0) * 1e3 / window)
    return statistics.median(times)


def bench_one(cfg, seq_len: int, opts: dict) -> tuple[float, float]:
    """(median ms per fwd+bwd step, peak MiB) for one config and length."""
    dev = torch.device(opts["device"])
    model = zoo.ZooModel(cfg).to(dev).train()
    fn = torch.compile(model) if opts["compile"] else model
    ids = torch.randint(0, cfg.vocab_size, (opts["batch"], seq_len), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=opts["dtype"] == "bf16")

    def step():
        model.zero_grad(set_to_none=True)  # grads freed before each step, as an optimizer loop would
        with amp:
            logits = fn(ids)
        # the input doubles as the target: the cost of a step does not depend on the labels
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        loss.backward()

    ms = median_step_ms(step, dev.type, opts["repeats"], opts["warmup"])
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()  # parameters, input, grads, activations, workspaces
    else:
        model.zero_grad(set_to_none=True)
        # what stays allocated through the step (weights, input) + the step's own peak, so that the
        # figure is comparable with max_memory_allocated on CUDA
        resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), ids])
        peak = resident + cpu_peak_bytes(step)
    return ms, peak / 2**20


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    # other processes on a shared CPU skew the timings: the load average says how busy it was
    return f"{cpu} ({torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f})"


def fmt(x, digits=3) -> str:
    return x if isinstance(x, str) else f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def write_outputs(rows: list[dict], opts: dict, argv: list[str]) -> str:
    out = Path(opts["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(fmt(r[c]) if not isinstance(r[c], int) else str(r[c]) for c in COLUMNS) + " |"
              for r in rows]
    table = "\n".join(table)
    cmd = "python scripts/bench.py " + " ".join(shlex.quote(a) for a in argv)
    dev = rows[0]["device"]
    Path(f"{out}.md").write_text(
        f"# Benchmark: forward+backward step vs sequence length\n\n```\n{cmd}\n```\n\n"
        f"Machine: {dev}; {platform.platform()}; torch {torch.__version__}; batch {opts['batch']}, "
        f"dtype {opts['dtype']}, compile {str(opts['compile']).lower()}, median of {opts['repeats']} after "
        f"{opts['warmup']} warm-up steps.\n\n{table}\n")
    with open(f"{out}.csv", "w", newline="") as f:
        (w := csv.DictWriter(f, fieldnames=[*COLUMNS, "batch", "dtype", "params"])).writeheader()
        w.writerows(rows)

    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["config"] for r in rows):
        ok = [r for r in rows if r["config"] == label and not isinstance(r["ms/step"], str)]
        for ax, key in zip(axes, ("ms/step", "peak MiB")):
            ax.plot([r["seq_len"] for r in ok], [r[key] for r in ok], marker="o", label=label)
    for ax, key in zip(axes, ("ms/step", "peak MiB")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=key, title=f"{key} ({opts['device']})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{dev}, batch {opts['batch']}, {opts['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    plt.close(fig)
    return table


def main(argv: list[str]) -> list[dict]:
    opts, configs = parse_args(argv)
    lens = opts["seq_lens"]  # ascending
    built = [build_config(c, max(lens)) for c in configs]  # every config is checked before any is timed
    dev_name, rows = device_name(opts["device"]), []
    for label, cfg in built:
        with torch.device("meta"):  # for the parameter and FLOP counts only: no memory, no init cost
            shape_only = zoo.ZooModel(cfg)
        for n in lens:
            torch.manual_seed(0)
            try:
                ms, mib = bench_one(cfg, n, opts)
            except (RuntimeError, MemoryError) as e:
                if not is_oom(e):
                    raise
                ms = mib = "OOM"
            finally:
                if opts["device"] == "cuda":
                    torch.cuda.empty_cache()
            tok_s = "OOM" if ms == "OOM" else opts["batch"] * n / (ms / 1e3)
            flops = "OOM" if ms == "OOM" else tok_s * shape_only.flops_per_token(n) / 1e12
            rows.append({"config": label, "seq_len": n, "ms/step": ms, "tokens/s": tok_s, "TFLOP/s": flops,
                         "peak MiB": mib, "device": dev_name, "torch": torch.__version__,
                         "batch": opts["batch"], "dtype": opts["dtype"], "params": shape_only.num_params()})
            print(f"[bench] {label} seq_len={n}: {fmt(ms)} ms, {fmt(mib)} MiB", file=sys.stderr)
    print(write_outputs(rows, opts, argv))
    print(f"[bench] wrote {opts['out']}.md, .csv, .png", file=sys.stderr)
    return rows


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"bench.py: error: {e}")
