"""Sparse mixture of SwiGLU experts with a top-k router (Shazeer 2017; Switch, Fedus 2021; Mixtral 2024).

Routing follows Hugging Face's MixtralSparseMoeBlock exactly (so converted weights give the same
outputs): softmax over all E router logits in float32, keep the top k, renormalise them to sum to 1
(which equals a softmax over the k selected logits).

Dispatch groups tokens by expert: the (token, expert) assignments are sorted by expert, so each
expert's tokens form one contiguous slice, and the experts run as one grouped matmul over those
slices (`torch._grouped_mm`, no host sync). Where the grouped matmul is unavailable for the device or
dtype, the same sorted slices run as one matmul per expert (a loop over the E experts, never over
tokens). Without a capacity limit the (token, expert) rows are a permutation, so tokens travel to their
experts and back by gathers in both directions (no scatter-add). `reference()` is the plain version the
tests hold both to: every expert on every token, weighted by its (possibly zero) gate.

Auxiliary losses are not returned by forward (the FFN keeps the block's calling convention): each
forward leaves its routing statistics in `self.stats`, and `ZooModel.aux_loss()` combines the
layers' statistics the way HF's `load_balancing_loss_func` does.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DISPATCHES = ("auto", "grouped", "loop", "reference")

_GROUPED_OK: dict = {}  # (device type, dtype) -> whether torch._grouped_mm runs there


def _grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    ok = _GROUPED_OK.get((device.type, dtype))
    return _probe_grouped_mm(device, dtype) if ok is None else ok


@torch.compiler.disable  # a real call on real tensors, run eagerly even when first reached inside torch.compile
def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    ok = hasattr(torch, "_grouped_mm")
    if ok:
        try:  # support varies by torch version, device capability and dtype: ask once, with a tiny call
            a = torch.zeros(16, 16, device=device, dtype=dtype)
            b = torch.zeros(2, 16, 16, device=device, dtype=dtype).transpose(-2, -1)
            torch._grouped_mm(a, b, offs=torch.tensor([8, 16], device=device, dtype=torch.int32))
        except (RuntimeError, NotImplementedError):
            ok = False
    _GROUPED_OK[(device.type, dtype)] = ok
    return ok


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation `perm` whose inverse is given. Autograd's own backward of x[index] is a
    scatter-add (an accumulating index_put: a sort, or atomics, since it cannot know the indices are distinct);
    for a permutation the gradient is the gather by the inverse."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class MoE(nn.Module):
    """E SwiGLU experts behind a top-k router. Expert weights are stacked, in nn.Linear's (out, in)
    layout: w13 (E, 2*d_ff, d_model) holds gate (w1) then up (w3) rows, w2 (E, d_model, d_ff) is down;
    HF Mixtral's `experts.gate_up_proj` / `experts.down_proj` have exactly these layouts."""

    def __init__(self, dim: int, hidden: int, n_experts: int = 8, top_k: int = 2, capacity_factor: float | None = None,
                 jitter: float = 0.0, dispatch: str = "auto", init_std: float = 0.02, out_std: float | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if dispatch not in DISPATCHES:
            raise ValueError(f"model.moe_dispatch={dispatch!r}; valid choices: {', '.join(DISPATCHES)}")
        self.n_experts, self.top_k, self.hidden = n_experts, top_k, hidden
        self.capacity_factor, self.jitter, self.dispatch = capacity_factor, jitter, dispatch
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        nn.init.normal_(self.w13, std=init_std)
        nn.init.normal_(self.w2, std=init_std if out_std is None else out_std)
        self.drop = nn.Dropout(dropout)
        self.stats: dict | None = None
        self.track_stats = True  # generation turns it off: a dozen small kernels per layer and decoded token

    @classmethod
    def from_config(cls, cfg) -> "MoE":
        # the residual projection is scaled like the dense FFN's (GPT-2's 1/sqrt(2 * n_layers))
        return cls(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.moe_top_k, cfg.moe_capacity_factor, cfg.moe_jitter,
                   cfg.moe_dispatch, cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5, cfg.dropout)

    def extra_repr(self):
        cap = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return f"experts={self.n_experts}, top_k={self.top_k}, d_ff={self.hidden}, {cap}"

    # --- routing -------------------------------------------------------------------------------------------------

    def route(self, x):
        """x: (T, d) -> router logits (T, E), probabilities (T, E) and gate weights (T, k) in float32, expert
        indices (T, k)."""
        r_in = x
        if self.training and self.jitter > 0:  # Switch's multiplicative jitter, on the router input only
            r_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.router(r_in)
        probs = logits.float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return logits, probs, weights / weights.sum(-1, keepdim=True), experts

    def capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def _record(self, logits, probs, experts, mask):
        """Routing statistics for the losses and for logging, over the non-padding tokens (HF's recipe)."""
        w = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask.float()
        counts = torch.zeros(self.n_experts, device=probs.device).scatter_add_(
            0, experts.reshape(-1), w.repeat_interleave(self.top_k))
        self.stats = {
            "counts": counts,  # top-k assignments per expert
            "prob_sum": (probs * w[:, None]).sum(0),  # router probability mass per expert
            "z_sum": (torch.logsumexp(logits.float(), -1).pow(2) * w).sum(),  # ST-MoE router z-loss, summed
            "rows": w.sum(),
        }

    # --- forward -------------------------------------------------------------------------------------------------

    def forward(self, x, key_padding_mask=None):
        """x: (batch, seq, d). key_padding_mask: (batch, seq_k) bool, True = real token; only the last `seq`
        columns concern these tokens (during cached decoding the mask also covers the cached keys)."""
        b, n, d = x.shape
        flat = x.reshape(-1, d)
        mask = key_padding_mask[:, -n:].reshape(-1) if key_padding_mask is not None else None
        logits, probs, weights, experts = self.route(flat)
        if self.track_stats:
            self._record(logits, probs, experts, mask)
        if self.dispatch == "reference":
            y = self._dense(flat, weights, experts)
        else:
            y = self._sparse(flat, weights, experts)
        return self.drop(y.view(b, n, d))

    def _sparse(self, x, weights, experts):
        t, e, k = x.shape[0], self.n_experts, self.top_k
        # slot-major flattening: within an expert's group, all first choices come before second choices, so a
        # capacity limit drops second choices first (GShard's priority), and tokens in order within a slot
        flat_expert = experts.t().reshape(-1)
        flat_weight = weights.t().reshape(-1)
        order = flat_expert.argsort(stable=True)
        counts = torch.zeros(e, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_expert, torch.ones_like(flat_expert))
        if torch.is_autocast_enabled(x.device.type):  # autocast does not cover the grouped matmul: cast as it would
            x = x.to(torch.get_autocast_dtype(x.device.type))
        cap = self.capacity(t)
        if cap is None:
            # every assignment runs, so `order` permutes the k*T slot-major rows: tokens go to their experts and
            # outputs come back by gathers, forward and backward, with no scatter-add; then each token's k
            # outputs are summed slot by slot
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
            xs = _PermuteRows.apply(x.repeat(k, 1), order, inverse)
            out = self._expert_outputs(xs, flat_weight[order], counts)
            return _PermuteRows.apply(out, inverse, order).view(k, t, -1).sum(0)
        sorted_expert = flat_expert[order]
        start = counts.cumsum(0) - counts
        rank = torch.arange(order.numel(), device=x.device) - start[sorted_expert]
        order = order[rank < cap]  # dropped assignments add nothing: the residual carries the token
        token = order % t
        out = self._expert_outputs(x[token], flat_weight[order], counts.clamp(max=cap))
        return out.new_zeros(x.shape).index_add_(0, token, out)

    def _expert_outputs(self, xs, gates, counts):
        """SwiGLU of each expert over its contiguous slice of xs, scaled by the rows' gate weights."""
        gate, up = self._experts_mm(xs, self.w13, counts).chunk(2, dim=-1)
        out = self._experts_mm(F.silu(gate) * up, self.w2, counts)
        return out * gates.to(out.dtype)[:, None]

    def _experts_mm(self, xs, w, counts):
        """Row slice i of xs (counts[i] rows, in expert order) times w[i].T, for every expert i."""
        # the grouped kernels need 16-byte aligned rows (e.g. d_model a multiple of 8 in bf16, of 4 in fp32), and
        # torch.compile's shape function accepts bf16 only (eager CPU takes any dtype)
        aligned = all(n * xs.element_size() % 16 == 0 for n in w.shape[1:])
        traceable = xs.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
        use_grouped = self.dispatch == "grouped" or (
            self.dispatch == "auto" and aligned and traceable and _grouped_mm_available(xs.device, xs.dtype))
        if use_grouped:
            offs = counts.cumsum(0).to(torch.int32)
            return torch._grouped_mm(xs, w.to(xs.dtype).transpose(-2, -1), offs=offs)
        # fallback: one matmul per expert over its contiguous slice (a loop over experts; one host sync)
        parts = xs.split(counts.tolist())
        return torch.cat([p @ w[i].to(p.dtype).t() for i, p in enumerate(parts)])

    def _dense(self, x, weights, experts):
        """Every expert on every token, weighted by its gate (zero where not selected or dropped)."""
        gates = torch.zeros(x.shape[0], self.n_experts, device=x.device, dtype=weights.dtype)
        gates.scatter_(1, experts, weights * self.keep_mask(experts))
        y = torch.zeros_like(x)
        for i in range(self.n_experts):
            gate, up = F.linear(x, self.w13[i]).chunk(2, dim=-1)
            y = y + F.linear(F.silu(gate) * up, self.w2[i]) * gates[:, i:i + 1].to(x.dtype)
        return y

    def keep_mask(self, experts):
        """(T, k) float: 1 where an assignment fits its expert's capacity, taking slot 0 of every token first,
        then slot 1, ..., and tokens in order within a slot. All ones when dropless."""
        cap = self.capacity(experts.shape[0])
        if cap is None:
            return torch.ones(experts.shape, device=experts.device)
        keep = torch.zeros(experts.shape, device=experts.device)
        used = torch.zeros(self.n_experts, dtype=torch.long, device=experts.device)
        for s in range(self.top_k):
            onehot = F.one_hot(experts[:, s], self.n_experts)  # (T, E)
            position = used + onehot.cumsum(0) - 1  # this assignment's place in its expert's queue
            keep[:, s] = (position.gather(1, experts[:, s:s + 1]).squeeze(1) < cap).float()
            used = used + onehot.sum(0)
        return keep

    def reference(self, x, key_padding_mask=None):
        """The dense-loop version of forward, for tests."""
        b, n, d = x.shape
        flat = x.reshape(-1, d)
        _, _, weights, experts = self.route(flat)
        return self._dense(flat, weights, experts).view(b, n, d)

    def expert_load(self) -> torch.Tensor:
        """Fraction of this layer's routed (token, slot) assignments that went to each expert in the last
        forward (sums to 1; 1/E each when balanced), non-padding tokens only."""
        c = self.stats["counts"]
        return c / c.sum().clamp(min=1)


def combine_aux(stats: list[dict], n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) over the layers' statistics.

    Load balancing is Switch's E * sum_i f_i * P_i (f_i: fraction of tokens routed to expert i, P_i: mean
    router probability of expert i), computed as HF's `load_balancing_loss_func`: f and P are pooled over all
    layers' tokens before the product, and f counts top-k assignments, so it sums to k and perfectly balanced
    routing gives k (not 1)."""
    rows = sum(s["rows"] for s in stats).clamp(min=1)
    f = sum(s["counts"] for s in stats) / rows
    p = sum(s["prob_sum"] for s in stats) / rows
    z = sum(s["z_sum"] for s in stats) / rows
    return n_experts * (f * p).sum(), z
