"""Decoding with a preallocated KV cache, and that decoding step replayed as a CUDA graph.

`ZooModel.generate(kv_cache=...)`:
- "dynamic" (default): each layer's cache grows by concatenation (zoo.blocks.cores.AttentionCore.append_kv);
  works for every core that has a cache, any length (past max_seq_len it recomputes the last window).
- "static": one (B, Hkv, prompt + new tokens, D) buffer per layer, filled in place at a position held in a
  device tensor (`_SoftmaxCore._static`): the same tokens as "dynamic", with shapes that never change.
- "cuda_graph": "static", with the one-token decoding step captured once as a CUDA graph and replayed for every
  new token. A batch-1-to-8 decoding step is bound by the host's kernel launches (hundreds per step); a replay
  launches them all at once.
The prompt (prefill) always runs eagerly, through the growing cache (the causal kernels, no mask), and is then
copied into the buffers. Static decoding needs cores with `supports_static_cache` (full and
causal softmax attention), no padding, and prompt + new tokens within model.max_seq_len.
"""
from __future__ import annotations

import torch

KV_CACHES = ("dynamic", "static", "cuda_graph")


def check_static(model, kv_cache: str, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse, before any work, what a static cache cannot decode; the error names the way out."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache={kv_cache!r}; valid choices: {', '.join(KV_CACHES)}")
    if kv_cache == "dynamic":
        return
    cfg = model.cfg
    core = model.trunk.blocks[0].attn.core
    if cfg.recurrence == "xl" or cfg.reversible or not getattr(core, "supports_static_cache", False):
        raise ValueError(f"kv_cache={kv_cache!r} needs full or causal softmax attention in a plain decoder "
                         f"(attention.core={cfg.attention['core']!r}); use kv_cache='dynamic'")
    total = prompt_len + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"kv_cache={kv_cache!r}: prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds model.max_seq_len={cfg.max_seq_len}; use kv_cache='dynamic'")
    if kv_cache == "cuda_graph" and not next(model.parameters()).is_cuda:
        raise ValueError("kv_cache='cuda_graph' needs the model on a CUDA device; use kv_cache='static'")


def static_cache(model, max_len: int, device, prefilled: list[dict] | None = None) -> list[dict]:
    """One dict per layer; all layers share the position tensor, the slot the next token's keys and values go
    to. Without `prefilled` each core allocates its buffers on first use (its kv heads and dtype); with it (a
    growing cache after the prompt, which ran through the causal kernels without a mask) the buffers start
    with its keys and values and the position after them."""
    pos = torch.zeros((), dtype=torch.long, device=device)
    caches = [{"max_len": max_len, "pos": pos, "k_buf": None, "v_buf": None} for _ in model.trunk.blocks]
    if prefilled is not None:
        n = prefilled[0]["k"].shape[2]
        pos.fill_(n)
        for c, p in zip(caches, prefilled):
            for name in ("k", "v"):
                t = p[name]
                buf = t.new_zeros(*t.shape[:2], max_len, t.shape[3])
                buf[:, :, :n] = t
                c[f"{name}_buf"] = buf
    return caches


class GraphedStep:
    """The one-token decoding step of `model` over `cache`, captured as a CUDA graph: call it with the new
    tokens (B, 1) after setting cache[0]["pos"] to their position; returns the next-token logits (B, V), a
    buffer the next call overwrites."""

    def __init__(self, model, cache: list[dict], batch: int):
        self.pos = cache[0]["pos"]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.pos.device)

        def step():
            return model.logits(model.hidden_states(self.tokens, start_pos=self.pos, cache=cache)[:, -1])

        # warm-up on a side stream (lazy initialisations, allocator pools), as torch.cuda.graphs asks; it writes
        # the slot at `pos`, which every real step rewrites before any layer reads it
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = step()
        except RuntimeError as e:  # e.g. a host sync inside the step (an MoE capacity limit drops tokens by mask)
            raise RuntimeError(f"kv_cache='cuda_graph' could not capture the decoding step ({e}); "
                               f"use kv_cache='static'") from e

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits
