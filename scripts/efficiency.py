"""LRA's efficiency table (Tay et al. 2021, Table 2) at model level: training steps/s and peak memory of
the same classifier with each attention core, against sequence length, relative to full attention.

    python scripts/efficiency.py                                   # CPU: small model, 256-4K tokens (~1-2 min)
    python scripts/efficiency.py device=cuda dtype=bf16            # the LRA ListOps model, 1K-16K tokens
    python scripts/efficiency.py cores=full,performer seq_lens=512,1024 out=outputs/efficiency/two

Every row is one model built by the zoo's registry (`zoo.model_config("bert", attention=CORE, ...)`, the
core's options from conf/attention/CORE.yaml plus those of conf/experiment/lra_listops.yaml), with the sizes
and batch of experiment=lra_listops (6 layers, d 512, 8 heads, MLP 2048, batch 32: `size=lra`, the CUDA
default) or a small model that a CPU times in seconds (`size=small`, the CPU default); `d_model=`,
`n_layers=`, `n_heads=`, `d_ff=`, `batch=` override single sizes. A step is what training does: forward,
classifier on the first token, cross-entropy, backward, AdamW step. A core that cannot serve an encoder
would run in the same model made causal (arch=decoder), marked "(causal)" (every core in DEFAULT_CORES serves
one: sparse_strided with its mirrored pattern since 2026-11-30); `lsh` gets the shared QK it needs. Full
attention is timed with every SDPA backend that runs (`sdpa_backends=`), and the fastest at each length is
the baseline the other rows are relative to (LRA's Table 2: its vanilla Transformer).

Time is the median of `repeats` steps after `warmup` (the first step compiles flex_attention on CUDA); peak
memory is max_memory_allocated on CUDA (weights, optimizer state, activations, workspaces) and, on CPU,
weights + optimizer state + input + the step's allocator peak (scripts/bench.py's cpu_peak_bytes). A run
out of memory is an OOM cell, and the longer lengths of that row are not tried. Results are rewritten after
every length, so a run cut short keeps what it measured. Writes <out>.md, <out>.csv and <out>.png.
`keep=<csv of an earlier run>` extends an earlier table: its rows at the lengths this run does not time are
kept (same device, dtype and batch, checked), e.g. `seq_lens=4096,8192,16384 keep=docs/results/efficiency_h200.csv`.
`attention=key:value,...` adds attention options to every core that takes them (YAML values), e.g.
`attention=recompute:true` for the linear cores' recomputing backward.
Options: device dtype size seq_lens cores sdpa_backends batch d_model n_layers n_heads d_ff repeats warmup out keep
attention.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import platform
import sys
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import zoo  # noqa: E402
from scripts._args import parse  # noqa: E402
from scripts.bench import device_name, fmt, is_oom  # noqa: E402
from scripts.bench_cores import SDPA_ORDER, measure  # noqa: E402
from zoo.blocks.cores import CORES as ZOO_CORES, split_options  # noqa: E402

CORES = ("full", "sliding_window", "longformer", "bigbird", "sparse_strided", "performer", "linear", "lsh", "causal")
DEFAULT_CORES = CORES[:-1]  # `causal` (SDPA causal) on request: the fair yardstick for a causal-only core
LRA_CONFIG = ROOT / "conf" / "experiment" / "lra_listops.yaml"
SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "batch": 2}
NUM_LABELS = 10  # ListOps' classes; the head's size does not move the cost
CUDA = torch.cuda.is_available()
DEFAULTS = {"device": "cuda" if CUDA else "cpu", "dtype": "bf16" if CUDA else "fp32", "size": "",
            "seq_lens": "", "cores": ",".join(DEFAULT_CORES), "sdpa_backends": "", "batch": "", "d_model": "",
            "n_layers": "", "n_heads": "", "d_ff": "", "repeats": "", "warmup": "",
            "out": "outputs/efficiency/efficiency", "keep": "", "attention": ""}
NUMBERS = ("batch", "d_model", "n_layers", "n_heads", "d_ff", "repeats", "warmup")  # "" = the device's default
BY_DEVICE = {  # defaults that depend on the device: (cuda, cpu)
    "size": ("lra", "small"), "seq_lens": ("1024,2048,3072,4096,8192,16384", "256,512,1024,2048,4096"),
    "sdpa_backends": ("cudnn,flash,efficient", "flash,math"), "repeats": (3, 2), "warmup": (2, 1)}


def lra_sizes() -> tuple[dict, dict]:
    """Sizes, batch and attention options of experiment=lra_listops, read from its file."""
    exp = yaml.safe_load(LRA_CONFIG.read_text())
    m = exp["model"]
    sizes = {k: m[k] for k in ("d_model", "n_layers", "n_heads", "d_ff")}
    return {**sizes, "batch": exp["data"]["batch_size"], "dropout": m.get("dropout", 0.0)}, m.get("attention", {})


def options(argv: list[str]) -> dict:
    o = parse(argv, DEFAULTS)
    for key, choices in (("device", ("cpu", "cuda")), ("dtype", ("fp32", "bf16"))):
        if o[key] not in choices:
            raise SystemExit(f"{key}={o[key]!r}; valid choices: {', '.join(choices)}")
    if o["device"] == "cuda" and not CUDA:
        raise SystemExit("device=cuda but torch.cuda.is_available() is False")
    pick = 0 if o["device"] == "cuda" else 1
    for key, both in BY_DEVICE.items():
        if o[key] == "":  # not given
            o[key] = both[pick]
    try:
        for key in NUMBERS:
            o[key] = int(o[key]) if o[key] != "" else None  # None: the size of `size=`
    except ValueError:
        raise SystemExit(f"{', '.join(NUMBERS)} take integers; got {key}={o[key]!r}") from None
    if o["size"] not in ("lra", "small"):
        raise SystemExit(f"size={o['size']!r}; valid choices: lra, small")
    o["cores"] = [c for c in str(o["cores"]).split(",") if c]
    bad = [c for c in o["cores"] if c not in CORES]
    if bad or not o["cores"]:
        raise SystemExit(f"cores={','.join(bad) or '(none)'}: unknown; valid choices: {', '.join(CORES)}")
    if "full" not in o["cores"]:
        raise SystemExit("cores must include full: it is the baseline every row is relative to")
    o["cores"] = ["full"] + [c for c in o["cores"] if c != "full"]
    names = {b.split("_")[0].lower(): b for b in SDPA_ORDER}
    o["sdpa_backends"] = [b for b in str(o["sdpa_backends"]).split(",") if b]
    bad = [b for b in o["sdpa_backends"] if b not in names]
    if bad or not o["sdpa_backends"]:
        raise SystemExit(f"sdpa_backends={','.join(bad) or '(none)'}; valid choices: {', '.join(names)}")
    try:
        o["seq_lens"] = sorted(int(n) for n in str(o["seq_lens"]).split(",") if n.strip())
    except ValueError:
        raise SystemExit(f"seq_lens={o['seq_lens']!r}: a comma list of integers") from None
    sizes, attn = lra_sizes() if o["size"] == "lra" else ({**SMALL, "dropout": 0.1}, lra_sizes()[1])
    for key in ("batch", "d_model", "n_layers", "n_heads", "d_ff"):
        sizes[key] = sizes[key] if o[key] is None else o[key]
    counts = [sizes[k] for k in ("batch", "d_model", "n_layers", "n_heads", "d_ff")] + o["seq_lens"] + [o["repeats"]]
    if min(counts) < 1 or o["warmup"] < 0:
        raise SystemExit("batch, d_model, n_layers, n_heads, d_ff, repeats and every seq_len must be >= 1, "
                         "warmup >= 0")
    o["sizes"], o["attention"] = sizes, {**attn, **attention_options(o["attention"])}
    return o


def attention_options(text: str) -> dict:
    out = {}
    for item in (i for i in str(text).split(",") if i.strip()):
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise SystemExit(f"attention={text!r}: a comma list of key:value pairs, e.g. attention=recompute:true")
        out[key.strip()] = yaml.safe_load(value)
    return out


def model_config(core: str, n: int, o: dict):
    """The zoo's own config for one row: conf/model/bert.yaml + conf/attention/<core>.yaml + LRA's sizes."""
    encoder = ZOO_CORES[core].supports_bidirectional
    extra, _ = split_options(core, dict(o["attention"]))  # LRA's options that this core takes
    s = o["sizes"]
    kw = dict(arch="encoder" if encoder else "decoder", d_model=s["d_model"], n_layers=s["n_layers"],
              n_heads=s["n_heads"], d_ff=s["d_ff"], dropout=s["dropout"], max_seq_len=n, num_labels=NUM_LABELS,
              shared_qk=ZOO_CORES[core].needs_shared_qk)
    cfg = zoo.model_config("bert", attention=core, **kw)
    if extra or core in ("full", "causal"):
        # the softmax cores go through SDPA (not flash-attn), whose backend the step picks
        attention = {**cfg.attention, **extra, **({"backend": "sdpa"} if core in ("full", "causal") else {})}
        cfg = zoo.model_config(cfg, attention=attention)
    return cfg


def impl_name(core: str, device: str) -> str:
    if core in ("sliding_window", "longformer", "bigbird", "sparse_strided"):
        return "flex" if device == "cuda" else "blocked"
    return {"performer": "FAVOR+", "linear": "elu+1", "lsh": "LSH chunked", "causal": "sdpa (auto)"}.get(core, "")


def time_step(cfg, n: int, o: dict, sdpa_backend: str | None) -> tuple[float, float]:
    """(median ms, peak MiB) of one training step of this config at length n."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device(o["device"])
    torch.manual_seed(0)
    model = zoo.ZooModel(cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    ids = torch.randint(2, cfg.vocab_size, (o["sizes"]["batch"], n), device=dev)
    labels = torch.randint(0, NUM_LABELS, (o["sizes"]["batch"],), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=o["dtype"] == "bf16")
    # full attention: this one SDPA backend; other cores: torch's own choice wherever they call SDPA
    chosen = [getattr(SDPBackend, b) for b in SDPA_ORDER if sdpa_backend and b.lower().startswith(sdpa_backend)]
    only = (lambda: sdpa_kernel(chosen)) if chosen else contextlib.nullcontext  # a fresh context per step

    def step():
        opt.zero_grad(set_to_none=True)
        with only(), amp:
            logits = model.classify(ids)
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()

    try:
        ms, mib = measure(step, o["device"], o["repeats"], o["warmup"])
        if dev.type == "cpu":  # what stays allocated through a step, as scripts/bench.py counts it
            state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
            resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), *state, ids])
            mib += resident / 2**20
        return ms, mib
    finally:
        model = opt = ids = None  # the step's closure holds them too: free them before the next row
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def run_row(core, n, o, backend=None) -> dict:
    cfg = model_config(core, n, o)
    label = core if cfg.arch == "encoder" or core == "causal" else f"{core} (causal)"
    if n == o["seq_lens"][0]:
        with torch.device("meta"):  # for the parameter count only: no memory, no init cost
            params = zoo.ZooModel(cfg).num_params()
    row = {"core": label, "impl": f"sdpa {backend}" if backend else impl_name(core, o["device"]), "seq_len": n,
           "params": params if n == o["seq_lens"][0] else ""}
    try:
        ms, mib = time_step(cfg, n, o, backend)
        row.update({"ms/step": ms, "steps/s": 1e3 / ms, "peak MiB": mib})
    except Exception as e:  # noqa: BLE001 -- an OOM (or a backend refusing a shape) on the GPU is a result
        if not is_oom(e) and (o["device"] == "cpu" and not backend):
            raise
        if not is_oom(e):
            traceback.print_exc()
        cell = "OOM" if is_oom(e) else f"error: {type(e).__name__}"
        row.update({"ms/step": cell, "steps/s": cell, "peak MiB": cell})
    print(f"[efficiency] {label:24s} {row['impl']:14s} {n:6d}: {fmt(row['ms/step'])} ms, {fmt(row['peak MiB'])} MiB",
          file=sys.stderr, flush=True)
    return row


def kept_rows(path: str, o: dict) -> list[dict]:
    """The rows of an earlier run's CSV at the lengths this run does not time (numbers parsed back)."""
    with open(path, newline="") as f:
        old = list(csv.DictReader(f))
    for r in old:
        setup = (r["device"], r["dtype"], int(r["batch"]))
        if setup != (o["device"], o["dtype"], o["sizes"]["batch"]):
            raise SystemExit(f"keep={path}: measured with device, dtype, batch = {setup}, not "
                             f"{(o['device'], o['dtype'], o['sizes']['batch'])}")
    rows = []
    for r in old:
        if int(r["seq_len"]) in o["seq_lens"]:
            continue
        row = {k: r[k] for k in COLS}
        row["seq_len"] = int(r["seq_len"])
        for k in ("ms/step", "steps/s", "peak MiB", "params"):
            row[k] = float(row[k]) if row[k] not in ("", "OOM") and not row[k].startswith("error") else row[k]
        rows.append(row)
    return rows


def relative(rows: list[dict]) -> None:
    """Each row's speed and memory as a multiple of full attention's (its fastest SDPA backend) at its length."""
    base = {r["seq_len"]: r for r in rows if r["core"] == "full"}
    for r in rows:
        b = base.get(r["seq_len"])
        ok = b is not None and not isinstance(r["steps/s"], str) and not isinstance(b["steps/s"], str)
        r["speed x"] = r["steps/s"] / b["steps/s"] if ok else ""
        r["memory x"] = r["peak MiB"] / b["peak MiB"] if ok else ""


def main(argv: list[str]) -> tuple[list[dict], list[dict]]:
    """Returns (rows: one per core and length, full attention's being its fastest backend; full attention
    under every SDPA backend)."""
    o = options(argv)
    if o["device"] == "cuda":
        # flex_attention compiles once per shape and mask: 4 sparse cores x 6 lengths exceed dynamo's default
        # limit of 8 recompiles, past which it would fall back to flex's slow dense path without a word
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
    for core in o["cores"]:
        model_config(core, o["seq_lens"][0], o)  # every config is checked before anything is timed
    kept = kept_rows(o["keep"], o) if o["keep"] else []
    rows, backends, oom = list(kept), [], set()  # oom: (core, backend) that ran out of memory at a shorter length
    for n in o["seq_lens"]:
        measured = []
        for core, backend in [("full", b) for b in o["sdpa_backends"]] + [(c, None) for c in o["cores"][1:]]:
            if (core, backend) in oom:
                row = {"core": core, "impl": f"sdpa {backend}" if backend else impl_name(core, o["device"]),
                       "seq_len": n, "params": "", **dict.fromkeys(("ms/step", "steps/s", "peak MiB"), "OOM")}
            else:
                row = run_row(core, n, o, backend)
            if row["ms/step"] == "OOM":
                oom.add((core, backend))
            measured.append(row)
        full = [r for r in measured if r["core"] == "full"]
        timed = [r for r in full if not isinstance(r["ms/step"], str)]
        rows.append(min(timed, key=lambda r: r["ms/step"]) if timed else full[0])
        rows += [r for r in measured if r["core"] != "full"]
        backends += full
        rows.sort(key=lambda r: r["seq_len"])  # kept rows of shorter and longer lengths around the new ones
        relative(rows)
        write(rows, backends, o, argv)
    return rows, backends


COLS = ["core", "impl", "seq_len", "ms/step", "steps/s", "peak MiB", "speed x", "memory x", "params"]


def _pivot(rows, lens, key, rel):
    head = "| model | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lens) + " |"
    lines = [head, "|---|" + "---|" * len(lens)]
    for core in dict.fromkeys(r["core"] for r in rows):
        cells = []
        for n in lens:
            r = next((r for r in rows if r["core"] == core and r["seq_len"] == n), None)
            cells.append("" if r is None else r[key] if isinstance(r[key], str) else f"{fmt(r[key])} ({r[rel]:.2f}x)")
        name = "full (fastest SDPA backend)" if core == "full" else core
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kept_note(o: dict, rows: list[dict]) -> str:
    if not o["keep"]:
        return ""
    lens = sorted({r["seq_len"] for r in rows} - set(o["seq_lens"]))
    timed = ", ".join(map(str, o["seq_lens"]))
    return (f"The rows at {', '.join(map(str, lens))} tokens are kept from the earlier run in `{o['keep']}` "
            f"(the same settings; its command is in the .md beside it); this run timed {timed}.\n\n")


def write(rows: list[dict], backends: list[dict], o: dict, argv: list[str]) -> None:
    out = Path(o["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    lens = sorted({r["seq_len"] for r in rows})
    mibs = [r["peak MiB"] for r in rows if not isinstance(r["peak MiB"], str)]
    unit, div = ("GiB", 1024) if mibs and max(mibs) > 1024 else ("MiB", 1)
    mem = [{**r, "peak": r["peak MiB"] / div if not isinstance(r["peak MiB"], str) else r["peak MiB"]} for r in rows]
    best = ", ".join(f"{r['seq_len']}: {r['impl']}" for r in rows if r["core"] == "full")
    btable = "\n".join(["| SDPA backend | seq_len | ms/step | peak MiB |", "|---|---|---|---|"]
                       + [f"| {r['impl']} | {r['seq_len']} | {fmt(r['ms/step'])} | {fmt(r['peak MiB'])} |"
                          for r in backends])
    s = o["sizes"]
    cmd = "python scripts/efficiency.py " + " ".join(argv)
    counts: dict[str, list[float]] = {}
    for r in rows:
        if r["params"] != "":
            counts.setdefault(r["core"], []).append(r["params"] / 1e6)
    params = ", ".join(f"{c} {min(v):.2f}M" if max(v) - min(v) < 0.005 else f"{c} {min(v):.2f}-{max(v):.2f}M"
                       for c, v in counts.items())
    Path(f"{out}.md").write_text(
        f"# Efficiency: training steps/s and peak memory per attention core (LRA Table 2's analogue)\n\n"
        f"```\n{cmd}\n```\n\n{kept_note(o, rows)}Machine: {device_name(o['device'])}; torch {torch.__version__}; "
        f"{platform.platform()}. Model: BERT-layout classifier, {s['n_layers']} layers, d_model {s['d_model']}, "
        f"{s['n_heads']} heads, MLP {s['d_ff']}, dropout {s['dropout']}, batch {s['batch']} "
        f"({'experiment=lra_listops' if o['size'] == 'lra' else 'small CPU size'}); {o['dtype']}; one step = "
        f"forward + backward + AdamW; median of {o['repeats']} after {o['warmup']} warm-up steps. "
        f"Parameters (a range where they differ between lengths): {params}.\n\n"
        f"## Training steps per second (x = relative to full attention)\n\n{_pivot(rows, lens, 'steps/s', 'speed x')}"
        f"\n\n## Peak memory, {unit} (x = relative to full attention)\n\n{_pivot(mem, lens, 'peak', 'memory x')}\n\n"
        f"Full attention's fastest SDPA backend per length: {best}. Every backend timed:\n\n{btable}\n")
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLS, "device", "dtype", "batch"], extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "device": o["device"], "dtype": o["dtype"], "batch": s["batch"]} for r in rows)

    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for core in dict.fromkeys(r["core"] for r in rows):
        ok = [r for r in rows if r["core"] == core and not isinstance(r["ms/step"], str)]
        for ax, key in zip(axes, ("ms/step", "peak MiB")):
            ax.plot([r["seq_len"] for r in ok], [r[key] for r in ok], marker="o", label=core,
                    linestyle="--" if core == "full" else "-", color="black" if core == "full" else None)
    for ax, key in zip(axes, ("ms per training step", "peak MiB")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=key)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{device_name(o['device'])}: {s['n_layers']} x {s['d_model']}, batch {s['batch']}, {o['dtype']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
