"""RETRO (Borgeaud et al. 2022): a decoder that reads neighbours retrieved for each chunk of its input.

The input of n tokens is cut into chunks of m = chunk_len. For every chunk u the data stage retrieved k
neighbours, each r tokens long (the neighbour chunk and its continuation): `neighbours (b, l, k, r)`.

- The neighbour encoder (a small bidirectional stack with rotary, i.e. relative, positions inside each
  neighbour) embeds the neighbours with the decoder's token embedding, and each of its layers cross-attends
  to the decoder's activations of the chunk the neighbours were retrieved for. It runs once, at the first
  chunked cross-attention layer, from the residual stream entering that layer.
- Chunked cross-attention (CCA) sits between attention and FFN in the decoder layers `cca_layers`. The causal
  offset: position i reads the neighbours of the last chunk complete at i, chunk u = (i + 1) // m - 1, so the
  last token of chunk u is the first to see them and the first m - 1 positions see none. Neighbours of a chunk
  are a function of that chunk only, so nothing after position i reaches it.
- No neighbours (`neighbours=None`, or model.retrieval=false, which builds no CCA at all) is the plain decoder,
  exactly: the CCA sub-layers are skipped, not fed zeros.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.blocks.block import Block
from zoo.blocks.norms import build_norm
from zoo.models.config import ModelConfig
from zoo.models.transformer import Transformer


class _CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention with a residual: queries from x, keys/values from `memory`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.q = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.kv = nn.Linear(cfg.d_model, 2 * inner, bias=cfg.bias)
        self.out = nn.Linear(inner, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.attn_dropout

    def attend(self, x, memory, memory_mask=None):
        """x (B, s, d), memory (B, t, d), memory_mask (B, t) True = readable -> (B, s, d), not yet residual.
        Rows whose memory is all masked read nothing (zero), not a softmax over padding."""
        B, s, _ = x.shape
        q = self.q(x).view(B, s, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, -1, self.n_heads, self.head_dim).transpose(1, 2) for t in self.kv(memory).chunk(2, dim=-1))
        mask = None
        if memory_mask is not None:
            has = memory_mask.any(-1)  # (B,)
            # a row with nothing to read would softmax over -inf only (NaN): let it read all, then zero it
            mask = (memory_mask | ~has[:, None])[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = self.out(y.transpose(1, 2).reshape(B, s, self.n_heads * self.head_dim))
        if memory_mask is not None:
            y = y * has[:, None, None].to(y.dtype)
        return self.dropout(y)


class ChunkedCrossAttention(_CrossAttention):
    """The decoder's CCA sub-layer: x + CCA(norm(x), encoded neighbours), with the causal offset."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.chunk_len = cfg.chunk_len

    def forward(self, x, context):
        retrieved = context.get("retrieved") if context else None
        if retrieved is None:
            return x
        enc, enc_mask, g = retrieved  # (b * g, k * r, d), (b * g, k * r), groups
        b, n, d = x.shape
        m = self.chunk_len
        h = self.norm(x)[:, m - 1: m - 1 + g * m]  # group u: positions u*m + m-1 .. u*m + 2m-2
        span = h.shape[1]
        h = F.pad(h, (0, 0, 0, g * m - span)).reshape(b * g, m, d)
        y = self.attend(h, enc, enc_mask).reshape(b, g * m, d)[:, :span]
        return x + F.pad(y, (0, 0, m - 1, n - (m - 1) - span))


class NeighbourCrossAttention(_CrossAttention):
    """The encoder's cross-attention: each neighbour token reads the decoder's activations of the chunk it
    was retrieved for (context["chunk_states"], (b * g * k, m, d))."""

    def forward(self, x, context):
        return x + self.attend(self.norm(x), context["chunk_states"])


class NeighbourEncoder(nn.Module):
    """Bidirectional blocks over each neighbour (rotary positions: relative inside the neighbour), each with a
    cross-attention to the decoder's chunk activations, and a final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # a dense FFN under a MoE decoder: the router losses are collected from the decoder's blocks only
        enc_cfg = dataclasses.replace(cfg, name=f"{cfg.name}-encoder", arch="encoder", position="rope",
                                      attention={"core": "full", "backend": cfg.attention.get("backend", "auto")},
                                      ffn="mlp" if cfg.ffn == "moe" else cfg.ffn, retrieval=False,
                                      n_kv_heads=None).validated()
        self.blocks = nn.ModuleList(Block(enc_cfg) for _ in range(cfg.retro_enc_layers))
        for block in self.blocks:
            block.cross = NeighbourCrossAttention(enc_cfg)
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)

    def forward(self, x, mask, chunk_states):
        """x (B, r, d) embedded neighbours, mask (B, r) True = a real token, chunk_states (B, m, d)."""
        positions = torch.arange(x.shape[1], device=x.device)
        # an all-padding neighbour (fewer than k found) would softmax over nothing: let it attend to its padding;
        # the decoder's CCA masks it out anyway
        kpm = mask | ~mask.any(-1, keepdim=True)
        context = {"chunk_states": chunk_states}
        for block in self.blocks:
            x = block(x, positions, kpm, None, context)
        return self.norm(x)


def retrieval_groups(n: int, chunk_len: int, n_chunks: int) -> int:
    """How many chunks' neighbours n positions can use: group u starts at u * m + m - 1."""
    return min(n_chunks, n // chunk_len)


def check_neighbours(neighbours: torch.Tensor, input_ids: torch.Tensor) -> None:
    if neighbours.dim() != 4 or neighbours.shape[0] != input_ids.shape[0] or 0 in neighbours.shape[1:]:
        raise ValueError(f"neighbours must be (batch={input_ids.shape[0]}, chunks, k, tokens), non-empty, "
                         f"got shape {tuple(neighbours.shape)}")


class RetroTransformer(Transformer):
    """zoo's Transformer plus a neighbour encoder and CCA in the layers `cca_layers`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = NeighbourEncoder(cfg)
        for i in cfg.cca_layers:
            self.blocks[i].cross = ChunkedCrossAttention(cfg)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_pos: int = 0, cache=None,
                global_attention_mask=None, neighbours=None, neighbour_mask=None):
        """neighbours: (b, l, k, r) token ids of chunk u's k neighbours (None: the plain decoder);
        neighbour_mask: (b, l, k, r) True = a real token (None: every token is real)."""
        x, positions, kpm, context = self.embed(input_ids, attention_mask, token_type_ids, start_pos,
                                                global_attention_mask)
        m = self.cfg.chunk_len
        g = 0
        if neighbours is not None:
            if start_pos or cache is not None:
                raise ValueError("RETRO reads neighbours from whole sequences from position 0: generation with "
                                 "neighbours recomputes the context (ZooModel.generate does)")
            check_neighbours(neighbours, input_ids)
            g = retrieval_groups(input_ids.shape[1], m, neighbours.shape[1])
        first = self.cfg.cca_layers[0]
        for i in range(len(self.blocks)):
            if g and i == first:
                context = {**(context or {}), "retrieved": self.encode(x, neighbours, neighbour_mask, g)}
            x = self.run_block(i, x, positions, kpm, cache, context)
        return self.norm(x) if self.norm is not None else x

    def encode(self, x, neighbours, neighbour_mask, g):
        """Encoded neighbours of the first g chunks, flattened per chunk for CCA:
        ((b * g, k * r, d), (b * g, k * r) mask, g)."""
        b, _, k, r = neighbours.shape
        m, d = self.cfg.chunk_len, x.shape[-1]
        nb = neighbours[:, :g].reshape(b * g * k, r)
        mask = (torch.ones_like(nb, dtype=torch.bool) if neighbour_mask is None
                else neighbour_mask[:, :g].reshape(b * g * k, r).bool())
        states = x[:, : g * m].reshape(b, g, 1, m, d).expand(b, g, k, m, d).reshape(b * g * k, m, d)
        enc = self.encoder(self.drop(self.tok_emb(nb)), mask, states)
        return enc.reshape(b * g, k * r, d), mask.reshape(b * g, k * r), g



class ChunkNeighbours:
    """Neighbours for generation: the context window starts on a chunk boundary, and each completed chunk is
    retrieved once (by its absolute index) with the user's `retrieve(chunks (l, m)) -> (tokens, mask)`."""

    def __init__(self, retrieve, chunk_len: int):
        self.retrieve, self.m = retrieve, chunk_len
        self.found: list[dict[int, tuple]] = []  # per batch row: chunk index -> (tokens (k, r), mask (k, r))

    def __call__(self, out: torch.Tensor, max_len: int):
        m = self.m
        start = -(-max(0, out.shape[1] - max_len) // m) * m
        ctx = out[:, start:]
        first, n_chunks = start // m, ctx.shape[1] // m
        if n_chunks == 0:
            return ctx, {}
        self.found += [{} for _ in range(out.shape[0] - len(self.found))]
        for row, found in enumerate(self.found):
            todo = [c for c in range(first, first + n_chunks) if c not in found]
            if todo:
                chunks = torch.stack([out[row, c * m:(c + 1) * m] for c in todo])
                tokens, mask = self.retrieve(chunks.cpu())
                for j, c in enumerate(todo):
                    found[c] = (torch.as_tensor(tokens[j]), torch.as_tensor(mask[j]))
        rows = [[self.found[r][c] for c in range(first, first + n_chunks)] for r in range(out.shape[0])]
        tokens = torch.stack([torch.stack([t for t, _ in row]) for row in rows]).to(out.device)
        mask = torch.stack([torch.stack([mk for _, mk in row]) for row in rows]).to(out.device)
        return ctx, {"neighbours": tokens, "neighbour_mask": mask}


def frozen_bert_embedder(vocab_size: int, ckpt: str | None = None, seed: int = 0, pad_id: int | None = None):
    """The RETRO paper's retriever at zoo scale: a frozen BERT, its last hidden states mean-pooled over a chunk's
    real tokens. `ckpt`: a zoo checkpoint of an encoder (python train.py model=bert); None builds a random-init
    BERT from `seed` (deterministic, but a weak retriever). Returns embed_fn(tokens (n, m)) -> (n, d) float32,
    named (embed_fn.__qualname__) by what it is, so the database caches its embeddings under that name."""
    from zoo.checkpoint import load_checkpoint  # both import zoo.models: here, not at the top, to avoid a cycle
    from zoo.models.registry import build_model

    if ckpt is not None:
        net, cfg = load_checkpoint(ckpt)
        if cfg.arch != "encoder":
            raise ValueError(f"retro_embedder=bert: {ckpt} holds a {cfg.arch}; the retriever is an encoder "
                             "(train one with python train.py model=bert)")
        if cfg.vocab_size < vocab_size:
            raise ValueError(f"retro_embedder=bert: {ckpt} has vocab_size={cfg.vocab_size}, the data needs "
                             f"{vocab_size} (train the encoder with the same data.tokenizer)")
        with open(ckpt, "rb") as f:
            name = f"bert:{hashlib.sha1(f.read()).hexdigest()[:16]}"
    else:
        warnings.warn("retro_embedder=bert without data.embedder.ckpt: a random-init BERT is a weak retriever; "
                      "train one first (python train.py model=bert)")
        torch.manual_seed(seed)
        net, name = build_model("bert", vocab_size=vocab_size), f"bert:random:{seed}:{vocab_size}"
    net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def embed(tokens: torch.Tensor) -> torch.Tensor:
        real = torch.ones_like(tokens, dtype=torch.bool) if pad_id is None else tokens != pad_id
        hidden = net.hidden_states(tokens, attention_mask=real)
        w = real[..., None].float()
        return ((hidden * w).sum(1) / w.sum(1).clamp(min=1)).float()

    embed.__qualname__ = f"frozen_bert_embedder({name},pad={pad_id})"
    return embed
