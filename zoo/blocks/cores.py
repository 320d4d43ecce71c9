"""Attention cores: the part of attention that maps (q, k, v) + context to outputs.

A core declares what it can do (bidirectional, causal, shared QK, incremental decoding with a KV
cache), and `check_core` validates a model/core pair once, when the config is built, with an
error that names the cores that would work. Later cores register themselves with `@register_core`.

The calling convention every core follows:
    core(q, k, v, key_padding_mask=None, cache=None, context=None) -> (batch, heads, seq_q, head_dim)
- `cache` is this layer's dict for incremental decoding; the core owns what goes in it (all keys
  and values for softmax, a rolling window for sliding-window attention, a fixed-size state for
  linear attention).
- `context` carries what some cores need beyond q, k, v: the block's input `hidden` (Longformer's
  global projections), `positions`, and per-example inputs such as `global_attention_mask`.
- `setup(cfg)` runs once after construction with the model config, for cores that own parameters.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

CORES: dict[str, type["AttentionCore"]] = {}


def register_core(cls):
    CORES[cls.name] = cls
    return cls


class AttentionCore(nn.Module):
    name = "abstract"
    supports_causal = False
    supports_bidirectional = False
    needs_shared_qk = False
    supports_kv_cache = False

    def __init__(self, causal: bool, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if backend not in kernels.BACKENDS:
            raise ValueError(f"attention.backend={backend!r}; valid choices: {', '.join(kernels.BACKENDS)}")
        self.causal = causal
        self.dropout = dropout
        self.backend = backend

    def setup(self, cfg) -> None:
        """Called once with the model config; cores with their own parameters create them here."""

    def forward(self, q, k, v, key_padding_mask=None, cache=None, context=None):
        raise NotImplementedError

    def reference(self, q, k, v, key_padding_mask=None, context=None):
        """The plain implementation that tests hold the fast path equal to."""
        raise NotImplementedError

    @staticmethod
    def append_kv(cache: dict, k, v, keep: int | None = None):
        """Add this step's keys/values to the cache and return all of them. `keep` bounds the
        cache to the last `keep` positions (a rolling buffer), so its memory stays constant."""
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        if keep is not None:
            cache["k"], cache["v"] = k[:, :, -keep:], v[:, :, -keep:]
        else:
            cache["k"], cache["v"] = k, v
        return k, v


class _SoftmaxCore(AttentionCore):
    supports_kv_cache = True
    supports_static_cache = True  # zoo.models.decoding: fixed-size buffers, what a CUDA graph can replay

    def forward(self, q, k, v, key_padding_mask=None, cache=None, context=None):
        if cache is not None and "max_len" in cache:
            return self._static(q, k, v, cache, key_padding_mask)
        if cache is not None:
            k, v = self.append_kv(cache, k, v)
        return kernels.attention(
            q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
        )

    def reference(self, q, k, v, key_padding_mask=None, context=None):
        return kernels.attention_reference(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)

    def _static(self, q, k, v, cache: dict, key_padding_mask=None):
        """Decoding into preallocated buffers (zoo.models.decoding.static_cache): this call's keys/values go to
        slots pos .. pos+n-1 of (B, Hkv, max_len, D) buffers, and the queries attend to the whole buffer under
        a mask of the filled slots. Every shape stays the same from one step to the next and the position is
        a device tensor, so a decoding step can be captured once and replayed as a CUDA graph."""
        if key_padding_mask is not None:
            raise ValueError("a static KV cache decodes unpadded prompts only: pass no attention_mask")
        b, h, n, d = q.shape
        if cache["k_buf"] is None:  # sized on first use: the layer's kv heads, head size and dtype
            shape = (b, k.shape[1], cache["max_len"], d)
            cache["k_buf"], cache["v_buf"] = k.new_zeros(shape), v.new_zeros(shape)
        kb, vb = cache["k_buf"], cache["v_buf"]
        slots = cache["pos"] + torch.arange(n, device=q.device)
        kb.index_copy_(2, slots, k.to(kb.dtype))
        vb.index_copy_(2, slots, v.to(vb.dtype))
        keys = torch.arange(kb.shape[2], device=q.device)
        seen = keys <= slots[:, None] if self.causal else (keys < slots[-1] + 1).expand(n, -1)  # (n, max_len)
        # query heads grouped under their kv head (GQA/MQA): one attention over Hkv heads of rep * n queries,
        # so the cache is never repeated per query head
        hkv = kb.shape[1]
        rep = h // hkv
        qg = q.reshape(b, hkv, rep * n, d)
        mask = seen.repeat(rep, 1)[None, None]
        out = F.scaled_dot_product_attention(qg, kb, vb, attn_mask=mask)
        return out.reshape(b, h, n, d)


@register_core
class FullCore(_SoftmaxCore):
    """Every token attends to every (non-padding) token: BERT's attention."""

    name = "full"
    supports_bidirectional = True


@register_core
class CausalCore(_SoftmaxCore):
    """Each token attends to itself and earlier tokens: GPT's attention."""

    name = "causal"
    supports_causal = True


def compatible_cores(causal: bool) -> list[str]:
    return sorted(n for n, c in CORES.items() if (c.supports_causal if causal else c.supports_bidirectional))


def check_core(name: str, causal: bool, model_name: str = "this model") -> type[AttentionCore]:
    if name not in CORES:
        raise ValueError(f"attention.core={name!r} is unknown; valid choices: {', '.join(sorted(CORES))}")
    cls = CORES[name]
    ok = cls.supports_causal if causal else cls.supports_bidirectional
    if not ok:
        kind = "a causal decoder" if causal else "a bidirectional encoder"
        raise ValueError(
            f"attention.core={name!r} cannot serve {model_name} ({kind}); "
            f"cores that would work: {', '.join(compatible_cores(causal))}"
        )
    return cls


def core_options(name: str) -> set[str]:
    """The options (constructor keywords) a core takes, besides `causal`."""
    params = inspect.signature(CORES[name].__init__).parameters
    return {p for p in params if p not in ("self", "causal", "dropout")}  # dropout: model.attn_dropout


def split_options(name: str, options: dict) -> tuple[dict, list[str]]:
    """Options for core `name`, and those that belong to another core only. A model's YAML sets its own
    core's options (model=longformer: window); switching core (attention=full) leaves them behind, and
    they are dropped rather than breaking the run. An option no core knows is an error."""
    mine = core_options(name)
    known = set().union(*(core_options(n) for n in CORES))
    unknown = sorted(set(options) - known - {"core"})
    if unknown:
        raise ValueError(f"attention option(s) {unknown} are unknown; core {name!r} takes: {', '.join(sorted(mine))}")
    kept = {k: v for k, v in options.items() if k in mine}
    return kept, sorted(set(options) - mine - {"core"})


def build_core(name: str, causal: bool, **options) -> AttentionCore:
    cls = check_core(name, causal)
    try:
        return cls(causal=causal, **options)
    except TypeError as e:
        raise ValueError(f"attention options {sorted(options)} do not fit core {name!r}: {e}") from None
