"""RETRO's costs: building the retrieval database, retrieving for a chunk, and training with retrieval.

    python scripts/bench_retro.py                                   # CPU: 1M-token database, small model
    python scripts/bench_retro.py tokens=[1000000,10000000] seq_len=512 batch=32 device=cuda

1. Database build per size in `tokens` (the first N tokens of the stdlib training split, byte tokens, in a fresh
   directory): seconds to chunk, embed (the default histogram embedder) and index (flat up to 100K chunks, IVF
   above), then to search every chunk's k neighbours; bytes on disk; each also per million tokens.
2. Retrieval latency for generation (data.retrieval.query): one chunk at a time, and per chunk in batches of 64.
3. Training: tokens/s of a fwd+bwd+AdamW step of the same decoder with retrieval (random neighbours, k per chunk)
   and without, at the size of experiment=retro_gain retro_size=small.
Writes <out>.md and <out>.json.
"""
from __future__ import annotations

import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _args import parse

import numpy as np
import torch

from data.modules import CausalLMDataModule
from data.retrieval import build_database, histogram_projection_embedder, neighbours, query
from data.retro import split_documents
from scripts.bench import device_name
from zoo.models import build_model

DEFAULTS = {"tokens": [1_000_000], "chunk_len": 64, "k": 2, "seq_len": 256, "batch": 8, "d_model": 256,
            "n_layers": 4, "n_heads": 4, "device": "auto", "steps": 10, "warmup": 3, "queries": 50,
            "out": "outputs/bench/retro"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_build(stream, eos_id, pad_id, n_tokens, args) -> dict:
    docs, total = [], 0
    for d in split_documents(stream, eos_id):
        if total >= n_tokens:
            break
        docs.append(d[: n_tokens - total])
        total += len(docs[-1])
    embed = histogram_projection_embedder(320, 64, pad_id=pad_id)
    tmp = Path(tempfile.mkdtemp(prefix="retro_bench_"))
    try:
        t0 = time.perf_counter()
        # what the data module builds: flat (exact) up to 100K chunks, IVF above
        db = build_database(docs, embed, tmp, chunk_len=args["chunk_len"], pad_id=pad_id, index="auto")
        t_build = time.perf_counter() - t0
        t2 = time.perf_counter()
        neighbours(db, args["k"], tokens=False)  # what the data module keeps: ids; tokens are gathered per batch
        t_search = time.perf_counter() - t2
        size = sum(f.stat().st_size for f in db.path.iterdir() if f.is_file())
        one = [db.chunks[i] for i in range(min(args["queries"], len(db)))]
        lat = []
        for c in one:
            s = time.perf_counter()
            query(db, c[None], args["k"])
            lat.append(time.perf_counter() - s)
        batch = np.stack([db.chunks[i % len(db)] for i in range(64)])
        s = time.perf_counter()
        for _ in range(5):
            query(db, batch, args["k"])
        batched = (time.perf_counter() - s) / 5 / 64
        mtok = total / 1e6
        return {"tokens": total, "chunks": len(db), "index_kind": type(db.index).__name__,
                "build_s": t_build, "search_s": t_search, "build_s_per_mtok": (t_build + t_search) / mtok, "disk_mb": size / 2**20,
                "disk_mb_per_mtok": size / 2**20 / mtok, "query_ms_one_chunk": 1e3 * statistics.median(lat),
                "query_ms_per_chunk_batch64": 1e3 * batched}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_train(args, device) -> list[dict]:
    rows = []
    m, n, b, k = args["chunk_len"], args["seq_len"], args["batch"], args["k"]
    for retrieval in (True, False):
        torch.manual_seed(0)
        net = build_model("retro", vocab_size=320, d_model=args["d_model"], n_layers=args["n_layers"],
                          n_heads=args["n_heads"], max_seq_len=n, chunk_len=m, retrieval=retrieval).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
        x = torch.randint(0, 256, (b, n), device=device)
        kw = {"neighbours": torch.randint(0, 256, (b, n // m, k, 2 * m), device=device)} if retrieval else {}
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step():
            with amp:
                logits = net(x, **kw)
            torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(args["warmup"]):
            step()
        _sync(device)
        times = []
        for _ in range(args["steps"]):
            t = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t)
        ms = 1e3 * statistics.median(times)
        rows.append({"retrieval": retrieval, "params": net.num_params(), "ms_per_step": ms,
                     "tokens_per_s": b * n / ms * 1e3})
    rows[0]["relative"], rows[1]["relative"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 1.0
    return rows


def main(argv):
    args = parse(argv, DEFAULTS)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args["device"] == "auto"
                          else args["device"])
    dm = CausalLMDataModule(cache_dir=".cache/zoo")
    train, _, _ = dm.token_streams()
    tok = dm.load_tokenizer()
    tokens = args["tokens"] if isinstance(args["tokens"], list) else [args["tokens"]]
    build = [bench_build(train, tok.eos_id, tok.pad_id, int(t), args) for t in tokens]
    for r in build:
        print(json.dumps(r), flush=True)
    training = bench_train(args, device)
    for r in training:
        print(json.dumps(r), flush=True)
    out = Path(args["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python scripts/bench_retro.py " + " ".join(argv)
    lines = [f"# RETRO: database build, retrieval latency, training speed\n\n```\n{cmd}\n```\n",
             f"Database and retrieval: {device_name('cpu')} (faiss-cpu). Training: {device_name(device.type)}; "
             f"{platform.platform()}; torch {torch.__version__}.\n",
             "| tokens | chunks | index | chunk + embed + index s | neighbour search s | total s / M tokens | disk MiB | "
             "MiB / M tokens | query ms (1 chunk) | query ms / chunk (batch 64) |", "|" + "---|" * 10]
    for r in build:
        lines.append(f"| {r['tokens']:,} | {r['chunks']:,} | {r['index_kind']} | {r['build_s']:.2f} | "
                     f"{r['search_s']:.2f} | {r['build_s_per_mtok']:.2f} | {r['disk_mb']:.1f} | "
                     f"{r['disk_mb_per_mtok']:.1f} | {r['query_ms_one_chunk']:.3f} | "
                     f"{r['query_ms_per_chunk_batch64']:.4f} |")
    lines += ["", f"Training step (fwd+bwd+AdamW), batch {args['batch']} x {args['seq_len']} tokens, "
              f"{args['k']} neighbours of {2 * args['chunk_len']} tokens per {args['chunk_len']}-token chunk, "
              f"d_model {args['d_model']}, {args['n_layers']} layers, median of {args['steps']}:", "",
              "| retrieval | params | ms / step | tokens / s | relative |", "|---|---|---|---|---|"]
    for r in training:
        lines.append(f"| {str(r['retrieval']).lower()} | {r['params'] / 1e6:.2f}M | {r['ms_per_step']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['relative']:.2f} |")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{out}.json").write_text(json.dumps({"build": build, "training": training}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
