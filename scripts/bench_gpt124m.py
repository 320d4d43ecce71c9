"""GPT-2 124M training throughput: our LightningModule against transformers' GPT2LMHeadModel, same run.

    python scripts/bench_gpt124m.py                      # on a GPU: bf16, compiled, batch 32 x 1024, both
    python scripts/bench_gpt124m.py --tiny               # CPU dry run: 2 layers, batch 2 x 64, no compile
    python scripts/bench_gpt124m.py --impls ours,ours-head,hf,hf-dropout --profile --sync-debug
    python scripts/bench_gpt124m.py --compile-mode max-autotune-no-cudagraphs   # both: Triton matmul templates

Implementations (--impls, each run in its own subprocess, one after another, on the same device):
  ours               zoo.tasks.CausalLM(model=gpt_124m, compile=True) trained by a Lightning Trainer
                     (bf16-mixed, the task's configure_optimizers = fused AdamW + warmup/cosine, gradient
                     clipping 1.0, a CSV logger every 10 steps as train.py's defaults) on random tokens
  ours-cudagraphs    experimental: the same with the training loss compiled in mode="reduce-overhead"
                     (CUDA graphs), set from here: the task itself compiles in the default mode (on an H200
                     it measured 62.7 ms/step against 63.5, within run-to-run noise: not adopted)
  ours-head          another checkout's task code, e.g. an older commit's (--head-root DIR, made with
                     `mkdir -p DIR && git archive COMMIT zoo kernels conf | tar -x -C DIR`), plus only the
                     gradient-clipping fix without which the tasks up to commit 78473d1 cannot run on a GPU
  hf                 transformers GPT2LMHeadModel(GPT2Config(), attn_implementation='sdpa'): vocabulary 50257,
                     dropout 0 (as our gpt_124m), torch.compile, bf16 autocast, fused AdamW (same param
                     groups and schedule), gradient clipping 1.0, a plain loop; loss from labels=
  hf-dropout         the same with GPT2Config's default dropouts (0.1 resid/embd/attn)

Timing: `--warmup` steps (compilation included) then `--steps` timed steps; the GPU is synchronised only
at the two ends of the timed window (tokens/s = tokens / wall time); ms/step is the median of CUDA-event
intervals between step starts. MFU = (6 N + attention) FLOPs per token x tokens/s / peak, with N the
non-embedding parameters plus the LM head's matmul and the attention term 12 L d T / 2 (causal), the
formula of ZooModel.flops_per_token (PaLM, appendix B); the peak is zoo.tasks.throughput.peak_flops for
bf16 (on an H100/H200: the datasheet's dense bf16 989.4 TFLOP/s; a measured 8192^3 bf16 matmul is
reported beside it). Peak memory: torch.cuda.max_memory_allocated over the run.

Writes bench_gpt124m.md and bench_gpt124m.json into $OUT when that variable is set, else outputs/bench/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("ours", "ours-cudagraphs", "ours-head", "hf", "hf-dropout")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="ours,hf", help=f"comma-separated, from {', '.join(IMPLS)}")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (32; --tiny: 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (1024; --tiny: 64)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (15)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (40; --tiny: 3)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (--tiny: 2)")
    p.add_argument("--device", default=None, help="cuda or cpu (cuda when available; --tiny: cpu)")
    p.add_argument("--no-compile", action="store_true", help="eager mode (implied by --tiny)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for every implementation: "
                   "default or max-autotune-no-cudagraphs (ours: task.compile_mode)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run of the whole script")
    p.add_argument("--profile", action="store_true", help="after the timed window, profile 3 steps of each "
                   "implementation: top kernels by GPU time into bench_gpt124m_profiles.txt")
    p.add_argument("--sync-debug", action="store_true", help="after the timed window, list every host-device "
                   "synchronisation of 2 steps of each implementation (torch.cuda.set_sync_debug_mode)")
    p.add_argument("--head-root", default=str(ROOT / ".bench_head"), help="another checkout's zoo/kernels/conf "
                   "for ours-head")
    p.add_argument("--impl-timeout", type=float, default=600, help="seconds for one implementation's run")
    p.add_argument("--out", default=None, help="output folder ($OUT, else outputs/bench)")
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    tiny = a.tiny
    a.batch = a.batch or (2 if tiny else 32)
    a.seq = a.seq or (64 if tiny else 1024)
    a.warmup = a.warmup if a.warmup is not None else (2 if tiny else 15)
    a.steps = a.steps or (3 if tiny else 40)
    a.layers = a.layers or (2 if tiny else None)
    a.compile = not (a.no_compile or tiny)
    if a.device is None:
        import torch

        a.device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    a.out = Path(a.out or os.environ.get("OUT") or ROOT / "outputs" / "bench")
    for name in a.impls.split(","):
        if name not in IMPLS:
            p.error(f"--impls: {name!r} is unknown; valid choices: {', '.join(IMPLS)}")
    if a.compile_mode not in ("default", "max-autotune-no-cudagraphs"):
        p.error(f"--compile-mode: {a.compile_mode!r} is unknown; valid choices: default, max-autotune-no-cudagraphs")
    return a


# ----------------------------------------------------------------------------------------------- helpers
def flops_per_token(n_nonembedding: int, vocab: int, d_model: int, n_layers: int, seq: int) -> float:
    """6 N + attention, N = non-embedding parameters + the LM head's matmul (ZooModel.flops_per_token)."""
    return 6 * (n_nonembedding + vocab * d_model) + 12 * n_layers * d_model * seq // 2


def make_batches(a, vocab: int, n: int = 4):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (a.batch, a.seq + 1), generator=g) for _ in range(n)]


class Window:
    """Times steps [warmup, warmup + steps): host clock between two synchronisations, plus CUDA events at
    every step start (read after the run, so timing adds no synchronisation inside the window)."""

    def __init__(self, a):
        import torch

        self.a, self.cuda = a, a.device == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.events, self.t0, self.t1, self.t_first = [], None, None, None
        self.t_start = time.perf_counter()

    def step_start(self, i):
        import torch

        if i == self.a.warmup:
            self.sync()
            self.t0 = time.perf_counter()
        if self.cuda and self.a.warmup <= i < self.a.warmup + self.a.steps:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append(ev)

    def step_end(self, i):
        import torch

        if i == 0:
            self.sync()
            self.t_first = time.perf_counter() - self.t_start
        if i == self.a.warmup + self.a.steps - 1:
            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self.events.append(ev)
            self.sync()
            self.t1 = time.perf_counter()

    def result(self, tokens_per_step: int) -> dict:
        wall = self.t1 - self.t0
        if self.cuda:
            ms = [a.elapsed_time(b) for a, b in zip(self.events[:-1], self.events[1:])]
        else:
            ms = [1e3 * wall / self.a.steps]
        return {"tokens_per_s": tokens_per_step * self.a.steps / wall, "ms_per_step": statistics.median(ms),
                "ms_per_step_mean": 1e3 * wall / self.a.steps, "ms_min": min(ms), "ms_max": max(ms),
                "first_step_s": self.t_first}


class Diagnostics:
    """After the timed window: host-device syncs of 2 steps (--sync-debug), then a profile of 3 (--profile)."""

    def __init__(self, a, name):
        self.a, self.name = a, name
        end = a.warmup + a.steps
        self.sync_steps = range(end, end + 2) if a.sync_debug and a.device == "cuda" else range(0)
        p0 = end + len(self.sync_steps)
        self.prof_steps = range(p0, p0 + 3) if a.profile else range(0)
        self.extra = len(self.sync_steps) + len(self.prof_steps)
        self.syncs: list[str] = []
        self.prof = None
        self._show = None

    def step_start(self, i):
        import torch

        if self.sync_steps and i == self.sync_steps.start:
            torch.cuda.synchronize()
            self._show = warnings.showwarning
            warnings.simplefilter("always")

            def record(message, *args, **kw):
                if "synchroniz" in str(message):
                    stack = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                             if "/zoo/" in f.filename or "/lightning/" in f.filename or "bench_gpt124m" in
                             f.filename or "/transformers/" in f.filename or "/kernels/" in f.filename]
                    self.syncs.append(" <- ".join(reversed(stack[-6:])))
                else:
                    self._show(message, *args, **kw)

            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
        if self.prof_steps and i == self.prof_steps.start:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.a.device == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()

    def step_end(self, i):
        import torch

        if self.sync_steps and i == self.sync_steps.stop - 1:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._show
        if self.prof_steps and i == self.prof_steps.stop - 1:
            if self.a.device == "cuda":
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            key = "cuda_time_total" if self.a.device == "cuda" else "cpu_time_total"
            table = self.prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=100)
            self.a.out.mkdir(parents=True, exist_ok=True)
            with open(self.a.out / "bench_gpt124m_profiles.txt", "a") as f:
                f.write(f"== {self.name}: 3 training steps, by {key}\n{table}\n")
            print(f"[bench] {self.name}: profile of 3 steps -> {self.a.out / 'bench_gpt124m_profiles.txt'}")
            print("\n".join(table.splitlines()[:30]))

    def report(self) -> dict:
        if not self.sync_steps:
            return {}
        counts: dict[str, int] = {}
        for s in self.syncs:
            counts[s] = counts.get(s, 0) + 1
        print(f"[bench] {self.name}: {len(self.syncs)} host-device syncs in 2 steps")
        for s, c in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"    {c} x {s}")
        return {"syncs_per_2_steps": len(self.syncs), "sync_sites": counts}


# ------------------------------------------------------------------------------------------------ ours
def run_ours(a, name: str) -> dict:
    if name == "ours-head":
        head = Path(a.head_root)
        if not (head / "zoo").is_dir():
            raise SystemExit(f"ours-head needs HEAD's code in {head}: mkdir -p {head} && "
                             f"git archive HEAD zoo kernels conf | tar -x -C {head}")
        sys.path.insert(0, str(head))
    else:
        sys.path.insert(0, str(ROOT))
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger

    import zoo
    from zoo.tasks import CausalLM
    from zoo.tasks.throughput import peak_flops

    assert Path(zoo.__file__).resolve().is_relative_to(Path(sys.path[0]).resolve()), zoo.__file__
    overrides = {"n_layers": a.layers} if a.layers else {}
    cfg = zoo.model_config("gpt_124m", **overrides).to_dict()
    task_cls = CausalLM
    if name == "ours-head":
        from lightning.pytorch.plugins.precision import Precision

        class HeadCausalLM(CausalLM):  # HEAD + the clipping fix (HEAD cannot clip with fused AdamW on a GPU)
            def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
                plugin = self.trainer.precision_plugin
                if gradient_clip_val and getattr(plugin, "scaler", False) is None:
                    Precision.clip_gradients(plugin, optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")
                else:
                    self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

        task_cls = HeadCausalLM
    mode = {} if a.compile_mode == "default" else {"compile_mode": a.compile_mode}  # ours-head may predate it
    task = task_cls(model=cfg, compile=a.compile, **mode)
    cudagraphs = name == "ours-cudagraphs" and a.compile
    if cudagraphs:
        from zoo.tasks.language_modeling import token_loss

        task._compiled["token_loss"] = torch.compile(token_loss, mode="reduce-overhead")
    batches = [{"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()} for x in make_batches(a, 50257)]
    if a.device == "cuda":
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    window, diag = Window(a), Diagnostics(a, name)

    class Data(pl.LightningDataModule):
        seq_len = a.seq

        def train_dataloader(self):
            class Stream(torch.utils.data.IterableDataset):
                def __iter__(self):
                    i = 0
                    while True:
                        yield batches[i % len(batches)]
                        i += 1

            return torch.utils.data.DataLoader(Stream(), batch_size=None)

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            window.step_start(batch_idx)
            diag.step_start(batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            window.step_end(batch_idx)
            diag.step_end(batch_idx)

    logdir = tempfile.mkdtemp(prefix="bench_logs_")
    trainer = pl.Trainer(
        accelerator="gpu" if a.device == "cuda" else "cpu", devices=1, precision="bf16-mixed",
        max_steps=a.warmup + a.steps + diag.extra, gradient_clip_val=1.0, logger=CSVLogger(logdir),
        log_every_n_steps=10, callbacks=[Timer()], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
    )
    trainer.fit(task, datamodule=Data())
    res = window.result(a.batch * a.seq)
    net = task.net
    res.update(diag.report())
    res["flops_per_token"] = net.flops_per_token(a.seq)
    res["params"] = net.num_params()
    res["vocab"] = net.cfg.vocab_size
    res["final_loss"] = float(trainer.callback_metrics["train/loss"])
    res["peak"], res["peak_source"] = peak_flops(torch.device(a.device), torch.bfloat16)
    return res


# -------------------------------------------------------------------------------------------------- hf
def run_hf(a, name: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from zoo.tasks.base import param_groups, warmup_cosine
    from zoo.tasks.throughput import peak_flops

    drop = {} if name == "hf-dropout" else {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    extra = {"n_layer": a.layers} if a.layers else {}
    config = GPT2Config(attn_implementation="sdpa", **drop, **extra)
    device = torch.device(a.device)
    model = GPT2LMHeadModel(config).to(device).train()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")
    total = a.warmup + a.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, min(100, total // 10 or 1), total, 0.1))
    step_fn = (torch.compile(model, mode=None if a.compile_mode == "default" else a.compile_mode) if a.compile
               else model)
    batches = [x[:, :-1].contiguous() for x in make_batches(a, config.vocab_size)]
    batches = [b.pin_memory() for b in batches] if device.type == "cuda" else batches
    window, diag = Window(a), Diagnostics(a, name)
    loss = None
    for i in range(a.warmup + a.steps + diag.extra):
        window.step_start(i)
        diag.step_start(i)
        ids = batches[i % len(batches)].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step_fn(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.step_end(i)
        diag.step_end(i)
    res = window.result(a.batch * a.seq)
    res.update(diag.report())
    c = config
    n_nonemb = sum(p.numel() for p in model.parameters()) - model.transformer.wte.weight.numel() \
        - model.transformer.wpe.weight.numel()
    res["flops_per_token"] = flops_per_token(n_nonemb, c.vocab_size, c.n_embd, c.n_layer, a.seq)
    res["params"] = sum(p.numel() for p in model.parameters())
    res["vocab"] = c.vocab_size
    res["final_loss"] = float(loss.detach())
    res["peak"], res["peak_source"] = peak_flops(device, torch.bfloat16)
    return res


def run_one(a) -> None:
    import torch

    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    res = (run_hf if a.run_one.startswith("hf") else run_ours)(a, a.run_one)
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else float("nan")
    res["mfu"] = res["flops_per_token"] * res["tokens_per_s"] / res["peak"]
    Path(a.result).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------ main
LABELS = {
    "ours": "ours: zoo CausalLM via Lightning",
    "ours-cudagraphs": "ours + CUDA graphs (experimental)",
    "ours-head": "ours at git HEAD (+ clip fix)",
    "hf": "transformers GPT2LMHeadModel (sdpa, dropout 0)",
    "hf-dropout": "transformers GPT2LMHeadModel (sdpa, default dropout 0.1)",
}


def matmul_rate(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    n = 8192
    x, y = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        x @ y
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - t)


def write_tables(a, argv, results, device_name, versions, mm, show=False) -> str:
    ok = {k: v for k, v in results.items() if "error" not in v}
    ref = ok.get("hf")
    lines = [
        f"GPT-2 124M training step, batch {a.batch} x {a.seq}, bf16-mixed, "
        f"{('torch.compile (mode ' + a.compile_mode + ')') if a.compile else 'eager'}, {device_name}; {a.steps} timed "
        f"steps after {a.warmup}.",
        "",
        "| implementation | tokens/s | ms/step | MFU | peak memory GiB | vs reference |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {LABELS[name]} | failed ({r['error']}) | | | | |")
            continue
        rel = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        lines.append(f"| {LABELS[name]} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['mfu']:.3f} | "
                     f"{r['peak_mem_gib']:.1f} | {rel} |")
    if ok:
        any_r = next(iter(ok.values()))
        lines += ["", f"MFU against {any_r['peak'] / 1e12:.1f} TFLOP/s ({any_r['peak_source']}: "
                      "zoo.tasks.throughput.peak_flops, bf16)"
                  + (f"; a measured 8192^3 bf16 matmul ran at {mm / 1e12:.0f} TFLOP/s on this device" if mm else "")
                  + ". FLOPs/token: " + ", ".join(f"{k} {v['flops_per_token'] / 1e6:.0f}M" for k, v in ok.items())
                  + " (6 N + causal attention)."]
    lines += ["", "Command: `python " + " ".join([str(Path(__file__).relative_to(ROOT))] + (argv if argv is not None
                                                                                            else sys.argv[1:])) + "`",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    table = "\n".join(lines)
    if show:
        print("\n" + table)
    (a.out / "bench_gpt124m.md").write_text(table + "\n")
    (a.out / "bench_gpt124m.json").write_text(json.dumps(
        {"device": device_name, "versions": versions, "matmul_bf16_flops": mm, "batch": a.batch, "seq": a.seq,
         "warmup": a.warmup, "steps": a.steps, "compile": a.compile, "compile_mode": a.compile_mode,
         "results": results}, indent=2))
    return table


def main(argv=None):
    a = parse_args(argv)
    if a.run_one:
        return run_one(a)
    import torch

    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_gpt124m_profiles.txt").unlink(missing_ok=True)
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    versions = {"torch": torch.__version__}
    for mod in ("lightning", "transformers", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    mm = matmul_rate(a.device)
    sys.path.insert(0, str(ROOT))
    from zoo.tasks.throughput import peak_flops

    peak, peak_source = peak_flops(torch.device(a.device), torch.bfloat16)
    results = {}
    passthrough = [f"--batch={a.batch}", f"--seq={a.seq}", f"--warmup={a.warmup}", f"--steps={a.steps}",
                   f"--device={a.device}", f"--out={a.out}", f"--head-root={a.head_root}"]
    passthrough += [f"--layers={a.layers}"] if a.layers else []
    passthrough += ["--no-compile"] if not a.compile else [f"--compile-mode={a.compile_mode}"]
    passthrough += ["--profile"] if a.profile else []
    passthrough += ["--sync-debug"] if a.sync_debug else []
    for name in a.impls.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result_path = f.name
        print(f"[bench] {name} ...", flush=True)
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, f"--run-one={name}", f"--result={result_path}",
                                   *passthrough], timeout=a.impl_timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout {a.impl_timeout} s"
        if rc != 0:
            print(f"[bench] {name} FAILED ({rc})", flush=True)
            results[name] = {"error": str(rc)}
            write_tables(a, argv, results, device_name, versions, mm)
            continue
        results[name] = json.loads(Path(result_path).read_text())
        r = results[name]
        r["peak"], r["peak_source"] = peak, peak_source  # one peak for every row (a measured one varies by run)
        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
        print(f"[bench] {name}: {r['tokens_per_s']:,.0f} tokens/s, {r['ms_per_step']:.1f} ms/step, "
              f"MFU {r['mfu']:.3f}, first step {r['first_step_s']:.1f} s, loss {r['final_loss']:.3f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        write_tables(a, argv, results, device_name, versions, mm)  # after each: a later failure loses nothing

    write_tables(a, argv, results, device_name, versions, mm, show=True)
    return results


if __name__ == "__main__":
    main()
