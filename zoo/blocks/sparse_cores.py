"""Sparse attention cores: sliding window, Longformer, BigBird, Sparse Transformer (strided / fixed).

The math is in kernels.sparse_patterns (a dense reference, a blocked linear-memory path, flex_attention on
CUDA); these classes hold the options, validate them, and own the decoding cache: a rolling buffer of the
last `window` keys for sliding-window attention (constant memory however long the generation runs), all
keys for the strided patterns (they reach back to the start).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.sparse_attention import dense_masked_attention, expand_kv
from kernels.sparse_patterns import (
    IMPLS,
    bigbird_attention,
    bigbird_block_table,
    gather_rows,
    longformer_attention,
    sliding_window_attention,
    sparse_strided_attention,
    strided_predicate,
    window_predicate,
)
from zoo.blocks.cores import AttentionCore, register_core

_UIDS = itertools.count()


def _positive(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"attention.{name}={value!r} must be an integer >= {minimum}")
    return value


class _SparseCore(AttentionCore):
    def __init__(self, causal: bool, dropout: float = 0.0, backend: str = "auto", impl: str = "auto"):
        super().__init__(causal, dropout, backend)
        if impl not in IMPLS:
            raise ValueError(f"attention.impl={impl!r}; valid choices: {', '.join(IMPLS)}")
        # backend=reference (the softmax cores' switch) also forces the dense reference here
        self.impl = "reference" if backend == "reference" else impl

    def _dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def _fast(self, q, k, v, key_padding_mask=None, impl=None, context=None):
        """The pattern's attention through `impl` (None = the core's own choice)."""
        raise NotImplementedError

    def forward(self, q, k, v, key_padding_mask=None, cache=None, context=None):
        if cache is not None:  # only cores with supports_kv_cache are ever handed one
            return self._decode(q, k, v, cache, self._fast)
        return self._fast(q, k, v, key_padding_mask, context=context)

    def reference(self, q, k, v, key_padding_mask=None, context=None):
        return self._fast(q, k, v, key_padding_mask, impl="reference", context=context)

    # decoding: the first call runs the fast path over the prompt; later steps attend from the few new
    # queries to the cached keys through the same predicate, on absolute positions
    def allowed(self):
        raise NotImplementedError

    def cache_size(self) -> int | None:
        return None

    def _decode(self, q, k, v, cache: dict, fast):
        seen = cache.get("seen", 0)
        n_q = q.shape[2]
        if "k" not in cache:
            out = fast(q, k, v)
            self.append_kv(cache, k, v, keep=self.cache_size())
        else:
            k, v = self.append_kv(cache, k, v, keep=self.cache_size())
            total = seen + n_q
            k_pos = torch.arange(total - k.shape[2], total, device=q.device)
            q_pos = torch.arange(seen, total, device=q.device)
            mask = self.allowed()(q_pos[:, None], k_pos[None, :])[None, None]
            out = dense_masked_attention(q, k, v, mask)
        cache["seen"] = seen + n_q
        return out


@register_core
class SlidingWindowCore(_SparseCore):
    """Each token sees the `window` nearest tokens: the `window` previous ones (self included) when causal,
    as Mistral; `window // 2` on each side otherwise, as Longformer. `dilation` d keeps every d-th token
    and reaches d times as far (Beltagy et al. 2020, section 3.1)."""

    name = "sliding_window"
    supports_causal = True
    supports_bidirectional = True
    supports_kv_cache = True

    def __init__(self, causal: bool, dropout: float = 0.0, backend: str = "auto", window: int = 256,
                 dilation: int = 1, impl: str = "auto"):
        super().__init__(causal, dropout, backend, impl)
        self.window = _positive("window", window)
        self.dilation = _positive("dilation", dilation)

    def allowed(self):
        return window_predicate(self.window, self.causal, self.dilation)

    def cache_size(self) -> int:
        return (self.window - 1) * self.dilation  # the rolling buffer: older keys are never seen again

    def _fast(self, q, k, v, key_padding_mask=None, impl=None, context=None):
        return sliding_window_attention(q, k, v, self.window, self.causal, self.dilation, key_padding_mask,
                                        dropout_p=self._dropout(), impl=impl or self.impl)


@register_core
class LongformerCore(_SparseCore):
    """Sliding window plus global tokens (Beltagy et al. 2020): `context["global_attention_mask"]` (B, N) marks
    them per example. A global token attends to all tokens and all attend to it; global attention has its own
    q/k/v projections (`global_qkv`, the paper's separate linear projections). Without global tokens it is
    exactly `sliding_window` (bidirectional)."""

    name = "longformer"
    supports_bidirectional = True
    uses_global_tokens = True

    PROJECTIONS = ("separate", "shared")

    def __init__(self, causal: bool, dropout: float = 0.0, backend: str = "auto", window: int = 256,
                 global_every: int = 0, global_projections: str = "separate", impl: str = "auto"):
        super().__init__(causal, dropout, backend, impl)
        self.window = _positive("window", window, minimum=2)
        # global_every=k: without a global_attention_mask, every k-th position is global (long-range paths for
        # masked-LM, where no token is special); 0 = none, as the paper's MLM pre-training
        self.global_every = _positive("global_every", global_every, minimum=0)
        if global_projections not in self.PROJECTIONS:
            raise ValueError(f"attention.global_projections={global_projections!r}; valid choices: "
                             f"{', '.join(self.PROJECTIONS)}")
        # shared: global tokens reuse the local q/k/v, so the core adds no parameters (equal-size comparisons)
        self.global_projections = global_projections
        self.global_qkv = None

    def setup(self, cfg) -> None:
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        if self.global_projections == "separate":
            self.global_qkv = nn.Linear(cfg.d_model, 3 * cfg.n_heads * cfg.head_dim, bias=cfg.bias)

    def _global_mask(self, context, q):
        gm = (context or {}).get("global_attention_mask")
        if gm is None and self.global_every:
            gm = (torch.arange(q.shape[2], device=q.device) % self.global_every == 0).expand(q.shape[0], -1)
        return gm

    def _global_qkv(self, context, idx):
        """The global projections for the global positions idx (B, G): queries at those rows only (the others'
        global queries are never used), keys and values at every row (a global query sees all of them)."""
        if self.global_qkv is None:
            raise ValueError("the longformer core was built without setup(cfg): it has no global projections")
        hidden = context["hidden"]
        b, n, d_model = hidden.shape
        hd = self.n_heads * self.head_dim
        w, bias = self.global_qkv.weight, self.global_qkv.bias
        rows = hidden.gather(1, idx[..., None].expand(b, idx.shape[1], d_model))
        qg = F.linear(rows, w[:hd], None if bias is None else bias[:hd]).view(b, -1, self.n_heads, self.head_dim)
        kv = F.linear(hidden, w[hd:], None if bias is None else bias[hd:]).view(b, n, 2, self.n_heads, self.head_dim)
        return qg.transpose(1, 2), *(t.transpose(1, 2) for t in kv.unbind(2))

    def _fast(self, q, k, v, key_padding_mask=None, impl=None, context=None):
        # the projections are a function of the global positions, called only when there are global tokens
        if self.global_projections == "shared":
            def g(idx):
                return (gather_rows(q, idx), *expand_kv(q, k, v))
        else:
            def g(idx):
                return self._global_qkv(context, idx)
        return longformer_attention(q, k, v, self.window, self._global_mask(context, q), g, key_padding_mask,
                                    dropout_p=self._dropout(), impl=impl or self.impl)


@register_core
class BigBirdCore(_SparseCore):
    """Block-sparse attention (Zaheer et al. 2020, ITC): blocks of `block_size`; each query block sees its
    neighbouring blocks, `num_global_blocks` blocks at each end (which see everything), and
    `num_random_blocks` random blocks per head. The random layout is drawn once per (layer, number of
    blocks) from `seed`, so runs and reloads reproduce it; `random_blocks[nb]` can fix it (an import)."""

    name = "bigbird"
    supports_bidirectional = True

    def __init__(self, causal: bool, dropout: float = 0.0, backend: str = "auto", block_size: int = 64,
                 num_random_blocks: int = 3, num_global_blocks: int = 1, seed: int = 0, impl: str = "auto"):
        super().__init__(causal, dropout, backend, impl)
        self.block_size = _positive("block_size", block_size)
        self.num_random_blocks = _positive("num_random_blocks", num_random_blocks, minimum=0)
        self.num_global_blocks = _positive("num_global_blocks", num_global_blocks, minimum=0)
        self.seed = seed
        self.layer_idx = 0
        self.n_heads = None
        self.random_blocks: dict[int, torch.Tensor] = {}
        self.uid = next(_UIDS)  # names this core's layout in flex's block-mask cache
        self._tables: dict[int, torch.Tensor] = {}

    def setup(self, cfg) -> None:
        self.n_heads = cfg.n_heads

    def table(self, nb: int, n_heads: int) -> torch.Tensor:
        if nb not in self._tables:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.layer_idx * 10_007 + nb)
            self._tables[nb] = bigbird_block_table(nb, n_heads, self.num_random_blocks, self.num_global_blocks, g,
                                                   self.random_blocks.get(nb))
        return self._tables[nb]

    def _fast(self, q, k, v, key_padding_mask=None, impl=None, context=None):
        nb = -(-q.shape[2] // self.block_size)
        table = self.table(nb, q.shape[1])
        if table.device != q.device:  # kept on the compute device, so that flex's block mask is built once
            table = self._tables[nb] = table.to(q.device)
        key = ("bigbird", self.uid, nb, q.shape[1])
        return bigbird_attention(q, k, v, self.block_size, table, self.num_global_blocks, key_padding_mask,
                                 dropout_p=self._dropout(), impl=impl or self.impl, cache_key=key)


@register_core
class SparseStridedCore(_SparseCore):
    """Sparse Transformer's factorised patterns (Child et al. 2019), both heads' sets merged into one softmax:
    `strided` sees the previous `stride` tokens and every stride-th token before them; `fixed` sees its own
    block of `stride` and the last `summary` tokens of every earlier block. In an encoder the patterns are
    mirrored (the paper's are causal): the `stride` - 1 nearest tokens on each side and every stride-th one
    either way; the whole own block and the summary tokens of every other block."""

    name = "sparse_strided"
    supports_causal = True
    supports_bidirectional = True
    supports_kv_cache = True
    PATTERNS = ("strided", "fixed")

    def __init__(self, causal: bool, dropout: float = 0.0, backend: str = "auto", stride: int = 128,
                 pattern: str = "strided", summary: int = 1, impl: str = "auto"):
        super().__init__(causal, dropout, backend, impl)
        if pattern not in self.PATTERNS:
            raise ValueError(f"attention.pattern={pattern!r}; valid choices: {', '.join(self.PATTERNS)}")
        self.stride = _positive("stride", stride)
        self.pattern = pattern
        self.summary = _positive("summary", summary)
        if self.summary > self.stride:
            raise ValueError(f"attention.summary={summary} must be <= attention.stride={stride}")

    def allowed(self):
        return strided_predicate(self.stride, self.pattern, self.summary, self.causal)

    def _fast(self, q, k, v, key_padding_mask=None, impl=None, context=None):
        return sparse_strided_attention(q, k, v, self.stride, self.pattern, self.summary, key_padding_mask,
                                        dropout_p=self._dropout(), impl=impl or self.impl, causal=self.causal)
