"""Attention cores: the part of attention that maps (q, k, v) + context to outputs.

A core declares what it can do (bidirectional, causal, shared QK, incremental decoding with a KV
cache), and `check_core` validates a model/core pair once, when the config is built, with an
error that names the cores that would work. Later cores register themselves with `@register_core`.
"""
from __future__ import annotations

import torch.nn as nn

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

    def forward(self, q, k, v, key_padding_mask=None):
        raise NotImplementedError

    def reference(self, q, k, v, key_padding_mask=None):
        """The plain implementation that tests hold the fast path equal to."""
        raise NotImplementedError


class _SoftmaxCore(AttentionCore):
    supports_kv_cache = True

    def forward(self, q, k, v, key_padding_mask=None):
        return kernels.attention(
            q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
        )

    def reference(self, q, k, v, key_padding_mask=None):
        return kernels.attention_reference(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)


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


def build_core(name: str, causal: bool, **options) -> AttentionCore:
    cls = check_core(name, causal)
    try:
        return cls(causal=causal, **options)
    except TypeError as e:
        raise ValueError(f"attention options {sorted(options)} do not fit core {name!r}: {e}") from None
