"""Linear-attention cores: `performer` (FAVOR+, Choromanski et al. 2021) and `linear` (elu + 1,
Katharopoulos et al. 2020). Both serve encoders and decoders; a decoder's cache holds the running
state (S = sum phi(k) v^T, z = sum phi(k)), whose size does not grow with the sequence.

There is no attention matrix, so there is nothing for attention dropout to drop: model.attn_dropout
must be 0 with these cores (an error says so rather than silently ignoring it).
"""
from __future__ import annotations

import torch

from kernels import linear_attention as la
from zoo.blocks.cores import AttentionCore, register_core

KERNELS = ("softmax", "relu")
# auto: the Triton kernels on CUDA (when triton is importable), the torch chunked scan elsewhere;
# chunked / triton: force one; reference: the quadratic form (tests, debugging)
BACKENDS = ("auto", "reference", "chunked", "triton")


def _expand_kv(q, k, v):
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def _in_backward() -> bool:
    """True while the autograd engine runs: activation checkpointing re-runs the forward there, and
    that re-run must see the features the original forward used (so it is not a call that counts)."""
    return torch._C._current_graph_task_id() != -1


class _LinearCore(AttentionCore):
    supports_causal = True
    supports_bidirectional = True
    supports_kv_cache = True

    def __init__(self, causal: bool, dropout: float = 0.0, backend: str = "auto", chunk_size: int = 64,
                 recompute: bool = False):
        super().__init__(causal, dropout, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"attention.backend={backend!r} for core {self.name!r}; "
                             f"valid choices: {', '.join(BACKENDS)}")
        if backend == "triton" and not la.triton_available():
            raise ValueError(f"attention.backend='triton' for core {self.name!r} needs the triton package; "
                             f"valid choices without it: auto, reference, chunked")
        if dropout:
            raise ValueError(f"attention.core={self.name!r} has no attention matrix to drop out: "
                             f"set model.attn_dropout=0 (got {dropout})")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"attention.chunk_size must be a positive integer, got {chunk_size!r}")
        if not isinstance(recompute, bool):
            raise ValueError(f"attention.recompute must be true or false, got {recompute!r}")
        self.backend, self.chunk_size, self.recompute = backend, chunk_size, recompute
        self.impl = backend if backend in la.IMPLS else "auto"  # what the kernels get (reference never reaches them)

    # the feature map: (phi_q, phi_k with padded keys zeroed, key offset or None); impl None = self.impl
    def features(self, q, k, key_padding_mask, offset=None, impl=None):
        raise NotImplementedError

    def forward(self, q, k, v, key_padding_mask=None, cache=None, context=None):
        k, v = _expand_kv(q, k, v)
        if key_padding_mask is not None and key_padding_mask.shape[-1] != k.shape[2]:
            key_padding_mask = key_padding_mask[:, -k.shape[2]:]  # a mask over the whole prefix: this step's part
        if self.backend == "reference" and cache is None:
            return self.reference(q, k, v, key_padding_mask)
        if cache is None:
            return self.attend(q, k, v, key_padding_mask)
        if not self.causal:
            raise ValueError(f"attention.core={self.name!r}: incremental decoding needs a causal model")
        old = cache.get("offset")
        phi_q, phi_k, offset = self.features(q, k, key_padding_mask, old)
        state = cache.get("state")
        if state is not None and offset is not None:
            # the new keys raised the stabiliser: bring the stored sums to the same scale
            scale = torch.exp(old - offset)
            state = (state[0] * scale, state[1] * scale[..., 0])
        out, cache["state"] = la.linear_attention(phi_q, phi_k, v, causal=True, chunk_size=self.chunk_size,
                                                  state=state, impl=self.impl)
        cache["offset"] = offset
        return out

    def attend(self, q, k, v, key_padding_mask):
        """The whole sequence at once (training, prefill without a cache): features, then linear attention."""
        if not self.causal and self.recompute:
            return la.recomputed_bidirectional_linear_attention(self.feature_fn(key_padding_mask), q, k, v)
        phi_q, phi_k, _ = self.features(q, k, key_padding_mask)
        if not self.causal:
            return la.bidirectional_linear_attention(phi_q, phi_k, v)
        return la.linear_attention(phi_q, phi_k, v, causal=True, chunk_size=self.chunk_size, impl=self.impl)[0]

    def feature_fn(self, key_padding_mask):
        """(q, k) -> (phi_q, phi_k): what a recomputing backward calls again."""
        return lambda q, k: self.features(q, k, key_padding_mask)[:2]

    def reference(self, q, k, v, key_padding_mask=None, context=None):
        k, v = _expand_kv(q, k, v)
        phi_q, phi_k, _ = self.features(q, k, key_padding_mask, impl="chunked")  # torch features: the reference
        return la.linear_attention_reference(phi_q, phi_k, v, causal=self.causal)


@register_core
class LinearCore(_LinearCore):
    """The Linear Transformer: phi(x) = elu(x) + 1, no parameters, no randomness."""

    name = "linear"

    def features(self, q, k, key_padding_mask, offset=None, impl=None):
        impl = impl or self.impl
        return la.elu_features(q, impl), la.mask_keys(la.elu_features(k, impl), key_padding_mask), None


@register_core
class PerformerCore(_LinearCore):
    """FAVOR+: positive (orthogonal) random features approximating the softmax kernel, or the
    generalized ReLU kernel. The projection is a buffer (checkpointed with the model); it is redrawn
    every `redraw_interval` training forward calls and never at eval.

    kernel="relu" with nb_features=None has no projection: phi(x) = relu(x) + eps on the head's own
    coordinates, unscaled. That is the Performer of LRA's released code (`make_fast_generalized_attention`,
    `features_type='deterministic'`), the model behind its Table 1 figures.

    Draws are seeded: draw i uses seed (base_seed, i), so every rank of a data-parallel run draws the
    same features. base_seed is `seed` when given (then every layer uses the same features), else
    drawn once per layer from torch's RNG at construction (reproducible under the run's seed)."""

    name = "performer"

    def __init__(self, causal: bool, dropout: float = 0.0, backend: str = "auto", chunk_size: int = 64,
                 nb_features: int | None = 256, kernel: str = "softmax", redraw_interval: int | None = 1000,
                 orthogonal: bool = True, seed: int | None = None, recompute: bool = False):
        super().__init__(causal, dropout, backend, chunk_size, recompute)
        if kernel not in KERNELS:
            raise ValueError(f"attention.kernel={kernel!r}; valid choices: {', '.join(KERNELS)}")
        if nb_features is None and kernel != "relu":
            raise ValueError(f"attention.nb_features=null (no projection) needs attention.kernel='relu', "
                             f"got kernel={kernel!r}; valid choices with softmax: a positive integer")
        if nb_features is not None and (not isinstance(nb_features, int) or nb_features < 1):
            raise ValueError(f"attention.nb_features must be a positive integer (or null with kernel relu), "
                             f"got {nb_features!r}")
        if redraw_interval is not None and (not isinstance(redraw_interval, int) or redraw_interval < 0):
            raise ValueError(f"attention.redraw_interval must be a non-negative integer or null, "
                             f"got {redraw_interval!r}")
        self.nb_features, self.kernel, self.orthogonal = nb_features, kernel, bool(orthogonal)
        self.redraw_interval = redraw_interval or 0
        # drawn on the CPU: also when the model is built under torch.device("meta") (scripts/bench.py)
        self.base_seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, (), device="cpu"))
        self.calls, self.draws = 0, 0
        self.register_buffer("projection", None)

    def setup(self, cfg) -> None:
        self._draw(cfg.head_dim)

    def _draw(self, dim: int, device=None) -> None:
        if self.nb_features is None:  # deterministic features: nothing to draw
            return
        seed = (self.base_seed + self.draws * 0x9E3779B97F4A7C15) % 2**63
        self.projection = la.random_projection(self.nb_features, dim, orthogonal=self.orthogonal, seed=seed,
                                               device=device)

    def redraw(self) -> None:
        """New random features (the next draw of this layer's seeded sequence)."""
        if self.nb_features is None:
            return
        self.draws += 1
        self._draw(self.projection.shape[1], self.projection.device)

    def forward(self, q, k, v, key_padding_mask=None, cache=None, context=None):
        if self.projection is None:  # built without setup(): the head size is known now
            self._draw(q.shape[-1], q.device)
        if self.training and self.redraw_interval and cache is None and not _in_backward():
            if self.calls and self.calls % self.redraw_interval == 0:
                self.redraw()
            self.calls += 1
        return super().forward(q, k, v, key_padding_mask, cache, context)

    def attend(self, q, k, v, key_padding_mask):
        if self.kernel == "softmax" and self.causal:  # one fused node on triton
            return la.causal_favor_attention(q, k, v, self.projection, key_padding_mask, self.chunk_size, self.impl)
        return super().attend(q, k, v, key_padding_mask)

    def feature_fn(self, key_padding_mask):
        projection, parent = self.projection, super().feature_fn(key_padding_mask)

        def features(q, k):
            if self.projection is not projection:
                raise RuntimeError("performer: the random features were redrawn between a forward and its backward "
                                   "(attention.recompute=true recomputes them there); set attention.recompute=false")
            return parent(q, k)
        return features

    def reference(self, q, k, v, key_padding_mask=None, context=None):
        if self.projection is None:
            self._draw(q.shape[-1], q.device)
        return super().reference(q, k, v, key_padding_mask, context)

    def features(self, q, k, key_padding_mask, offset=None, impl=None):
        if self.kernel == "relu":
            phi_k = la.relu_features(k, self.projection)
            return la.relu_features(q, self.projection), la.mask_keys(phi_k, key_padding_mask), None
        return la.favor_features(q, k, self.projection, key_padding_mask, offset, impl=impl or self.impl)

    # the redraw schedule travels with the checkpoint, so a resumed run redraws when the original would have
    def get_extra_state(self):
        return {"base_seed": self.base_seed, "calls": self.calls, "draws": self.draws}

    def set_extra_state(self, state):
        self.base_seed, self.calls, self.draws = int(state["base_seed"]), int(state["calls"]), int(state["draws"])

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, kernel={self.kernel}, nb_features={self.nb_features}, "
                f"orthogonal={self.orthogonal}, redraw_interval={self.redraw_interval}, recompute={self.recompute}")
