"""The `lsh` core: Reformer's locality-sensitive-hashing attention (kernels.lsh_attention holds the math).

It needs shared QK (model.shared_qk=true): the hash must put a query and the keys it should see in the same
bucket, which angular LSH guarantees only when keys are the queries. The rotations are drawn once per
(layer, n_buckets) from `seed`, so training steps, evaluation and a reloaded checkpoint hash alike; the
paper redraws them every step, which the zoo trades for reproducibility (and `eval_n_hashes` lets a model
trained with few hashes be evaluated with more, the paper's table 2).
"""
from __future__ import annotations

import torch

from kernels.lsh_attention import default_n_buckets, lsh_attention, lsh_attention_reference, random_rotations
from zoo.blocks.cores import AttentionCore, register_core

IMPLS = ("auto", "chunked", "reference")


def _int_option(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"attention.{name}={value!r} must be an integer >= {minimum}")
    return value


@register_core
class LSHCore(AttentionCore):
    """Each token attends within its hash bucket's chunk and the previous chunk, over `n_hashes` rounds
    (Kitaev et al. 2020, section 2). `n_buckets: null` picks HF's rule (about two buckets per chunk)."""

    name = "lsh"
    supports_causal = True
    supports_bidirectional = True
    needs_shared_qk = True

    def __init__(self, causal: bool, dropout: float = 0.0, backend: str = "auto", n_hashes: int = 2,
                 n_buckets: int | None = None, chunk_length: int = 64, seed: int = 0, seed_per_layer: bool = True,
                 impl: str = "auto"):
        super().__init__(causal, dropout, backend)
        self.n_hashes = _int_option("n_hashes", n_hashes)
        if n_buckets is not None and (_int_option("n_buckets", n_buckets, 2) % 2):
            raise ValueError(f"attention.n_buckets={n_buckets} must be even (angular LSH uses +-rotations), or null")
        self.n_buckets = n_buckets
        self.chunk_length = _int_option("chunk_length", chunk_length)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"attention.seed={seed!r} must be an integer")
        self.seed = seed
        # HF's hash_seed gives every layer the same rotations; per-layer seeds decorrelate the layers' hashes
        self.seed_per_layer = bool(seed_per_layer)
        if impl not in IMPLS:
            raise ValueError(f"attention.impl={impl!r}; valid choices: {', '.join(IMPLS)}")
        self.impl = "reference" if backend == "reference" else impl
        self.layer_idx = 0
        self.eval_n_hashes: int | None = None  # set by evaluation code to hash more (or fewer) rounds
        self._rotations: dict[tuple, torch.Tensor] = {}

    def rotation_seed(self) -> int:
        return self.seed * 1_000_003 + self.layer_idx * 10_007 if self.seed_per_layer else self.seed

    def rotations(self, n: int, n_heads: int, head_dim: int, device, n_hashes: int | None = None,
                  dtype=torch.float32) -> torch.Tensor:
        n_buckets = self.n_buckets or default_n_buckets(-(-n // self.chunk_length) * self.chunk_length,
                                                        self.chunk_length)
        n_hashes = n_hashes or self.n_hashes
        draw = torch.float64 if dtype == torch.float64 else torch.float32  # half precision hashes in float32
        key = (n_buckets, n_hashes, n_heads, head_dim, str(device), draw)
        if key not in self._rotations:
            rot = random_rotations(n_heads, head_dim, n_hashes, n_buckets, self.rotation_seed(), draw)
            self._rotations[key] = rot.to(device)
        return self._rotations[key]

    def _hashes(self) -> int:
        return self.eval_n_hashes if (self.eval_n_hashes and not self.training) else self.n_hashes

    def _run(self, q, v, key_padding_mask, impl):
        rot = self.rotations(q.shape[2], q.shape[1], q.shape[3], q.device, self._hashes(), q.dtype)
        if impl == "reference":
            return lsh_attention_reference(q, v, rot, self.chunk_length, self.causal, key_padding_mask)
        return lsh_attention(q, v, rot, self.chunk_length, self.causal, key_padding_mask,
                             dropout_p=self.dropout if self.training else 0.0)

    def forward(self, q, k, v, key_padding_mask=None, cache=None, context=None):
        if cache is not None:
            raise ValueError("attention.core='lsh' has no KV cache: generation recomputes the context")
        # k is q (shared QK); the kernel derives the normalised keys from q itself
        return self._run(q, v, key_padding_mask, self.impl)

    def reference(self, q, k, v, key_padding_mask=None, context=None):
        return self._run(q, v, key_padding_mask, "reference")
