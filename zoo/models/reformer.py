"""The Reformer's trunk pieces (Kitaev et al. 2020): the reversible stack, the chunked FFN, axial positions.

Reversible residual layers (RevNet, Gomez et al. 2017) on two streams, as Trax and HF's ReformerModel:
    y1 = x1 + Attn(x2)        x1 = y1 - Attn(x2)
    y2 = x2 + FFN(y1)         x2 = y2 - FFN(y1)
with Attn(x) = dropout(attention(norm1(x))) and FFN(x) = ffn(norm2(x)) (the zoo Block's own modules, so
every core, FFN and MoE works inside it). The forward pass keeps only the last layer's output; the backward
pass rebuilds each layer's input from its output and recomputes that layer's activations, so activation
memory is one layer's, whatever the depth. Both streams start as the embeddings and end concatenated
(width 2 * d_model) into the final norm and the LM head.

The FFN is applied to `ffn_chunks` slices of the sequence in turn, in the forward pass and in the recomputation,
so its (tokens, d_ff) activation is 1 / ffn_chunks of the whole; it is position-wise, so the result is the same.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class AxialPositions(nn.Module):
    """Axial positional embeddings (HF AxialPositionEmbeddings, eval semantics): position p = (p // s1, p % s1)
    gets concat(E0[p // s1], E1[p % s1]) with E0 (s0, d0), E1 (s1, d1), d0 + d1 = d_model: s0*d0 + s1*d1
    parameters instead of s0*s1*d_model for a table of s0*s1 positions."""

    def __init__(self, shape: tuple[int, int], dims: tuple[int, int]):
        super().__init__()
        self.shape, self.dims = tuple(shape), tuple(dims)
        self.max_len = shape[0] * shape[1]
        # laid out as HF's weights (s0, 1, d0) and (1, s1, d1), so conversion is a copy
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(shape[0], 1, dims[0]) * 0.02),
                                         nn.Parameter(torch.randn(1, shape[1], dims[1]) * 0.02)])

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        s0, s1 = self.shape
        w0, w1 = self.weights
        table = torch.cat([w0.expand(s0, s1, -1), w1.expand(s0, s1, -1)], dim=-1).reshape(s0 * s1, -1)
        return table[positions]


def chunked(fn, x: torch.Tensor, chunks: int) -> torch.Tensor:
    if chunks <= 1:
        return fn(x)
    return torch.cat([fn(c) for c in x.chunk(chunks, dim=1)], dim=1)


class _RNG:
    """The RNG state at a sub-layer's forward, replayed when it is recomputed, so dropout masks match."""

    def __init__(self, device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        ctx = torch.random.fork_rng(devices=devices)
        ctx.__enter__()
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        return ctx


def _attn(block, x, run):
    return block.dropout(block.attn(block.norm1(x), run["positions"], run["key_padding_mask"], None, run["context"]))


def _ffn(block, x, run):
    return chunked(lambda t: block._ffn(block.norm2(t), None), x, run["ffn_chunks"])


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, run, *params):
        rngs = []
        with torch.no_grad():
            for block in run["blocks"]:
                r_attn = _RNG(x1.device)
                x1 = x1 + _attn(block, x2, run)
                r_ffn = _RNG(x1.device)
                x2 = x2 + _ffn(block, x1, run)
                rngs.append((r_attn, r_ffn))
        ctx.run, ctx.rngs, ctx.params = run, rngs, params
        ctx.save_for_backward(x1, x2)  # the only activations kept: one layer's output
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        run, params = ctx.run, ctx.params
        y1, y2 = ctx.saved_tensors
        grads = {id(p): None for p in params}

        def accumulate(ps, gs):
            for p, g in zip(ps, gs):
                if g is not None:
                    grads[id(p)] = g if grads[id(p)] is None else grads[id(p)] + g

        for block, (r_attn, r_ffn) in zip(reversed(run["blocks"]), reversed(ctx.rngs)):
            f_params = [p for m in (block.norm1, block.attn) for p in m.parameters() if p.requires_grad]
            g_params = [p for m in (block.norm2, block.ffn) for p in m.parameters() if p.requires_grad]
            # FFN sub-layer: recompute FFN(y1), chunk by chunk, to get x2 and push dy2 through it
            rng = r_ffn.replay()
            try:
                y1 = y1.detach().requires_grad_(True)
                with torch.enable_grad():
                    g_out = _ffn(block, y1, run)
                gs = torch.autograd.grad(g_out, [y1, *g_params], dy2, allow_unused=True)
            finally:
                rng.__exit__(None, None, None)
            with torch.no_grad():
                x2 = y2 - g_out
                dy1 = dy1 + (gs[0] if gs[0] is not None else 0)
            accumulate(g_params, gs[1:])
            del g_out
            # attention sub-layer: recompute Attn(x2) to get x1 and push dy1 through it
            rng = r_attn.replay()
            try:
                x2 = x2.detach().requires_grad_(True)
                with torch.enable_grad():
                    f_out = _attn(block, x2, run)
                fs = torch.autograd.grad(f_out, [x2, *f_params], dy1, allow_unused=True)
            finally:
                rng.__exit__(None, None, None)
            with torch.no_grad():
                x1 = y1 - f_out
                dy2 = dy2 + (fs[0] if fs[0] is not None else 0)
            accumulate(f_params, fs[1:])
            y1, y2 = x1.detach(), x2.detach()
        return (dy1, dy2, None, *(grads[id(p)] for p in params))


def reversible_stack(blocks, x: torch.Tensor, positions, key_padding_mask=None, context=None,
                     ffn_chunks: int = 1) -> torch.Tensor:
    """Run `blocks` (zoo Blocks, pre-norm) reversibly on x (B, N, d); returns (B, N, 2d): both streams."""
    run = {"blocks": list(blocks), "positions": positions, "key_padding_mask": key_padding_mask,
           "context": context, "ffn_chunks": ffn_chunks}
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in blocks.parameters())):
        params = [p for p in blocks.parameters() if p.requires_grad]
        y1, y2 = _Reversible.apply(x, x, run, *params)
    else:  # inference: the same arithmetic without the autograd function
        y1, y2 = x, x
        for block in run["blocks"]:
            y1 = y1 + _attn(block, y2, run)
            y2 = y2 + _ffn(block, y1, run)
    return torch.cat([y1, y2], dim=-1)


def plain_stack(blocks, x, positions, key_padding_mask=None, context=None, ffn_chunks: int = 1):
    """The same two-stream network with ordinary autograd (all activations kept): the reference for gradients."""
    run = {"positions": positions, "key_padding_mask": key_padding_mask, "context": context,
           "ffn_chunks": ffn_chunks}
    y1, y2 = x, x
    for block in blocks:
        y1 = y1 + _attn(block, y2, run)
        y2 = y2 + _ffn(block, y1, run)
    return torch.cat([y1, y2], dim=-1)
