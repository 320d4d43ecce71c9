"""The generic trunk (embeddings -> blocks -> final norm) and the model with its heads.

GPT and BERT are both this file plus a YAML: the differences (pre/post norm, embedding norm,
segment embeddings, the MLM head's transform) are config fields, not subclasses.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from zoo.blocks.block import Block
from zoo.blocks.ffn import activation
from zoo.blocks.moe import MoE, combine_aux
from zoo.blocks.norms import build_norm
from zoo.blocks.positions import build_absolute_positions
from zoo.models import decoding
from zoo.models.config import ModelConfig
from zoo.models.reformer import AxialPositions, reversible_stack
from zoo.models.transformer_xl import TransformerXL


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = (AxialPositions(cfg.axial_shape, cfg.axial_dims) if cfg.axial_shape
                        else build_absolute_positions(cfg.position, cfg.max_seq_len, cfg.d_model))
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.emb_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.share_layers:  # the same module at every index: one set of weights, n_layers applications
            self.blocks = nn.ModuleList([Block(cfg)] * cfg.n_layers)
        else:
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        for i, block in enumerate(self.blocks):
            block.attn.core.layer_idx = i  # cores with per-layer randomness (BigBird's layout) seed from it
        self.norm = build_norm(cfg.norm, cfg.hidden_width, cfg.norm_eps, cfg.bias) if cfg.final_norm else None

    def embed(self, input_ids, attention_mask=None, token_type_ids=None, start_pos: int = 0,
              global_attention_mask=None):
        """Token (+ position, segment) embeddings, and what every block reads besides x."""
        b, n = input_ids.shape
        if torch.is_tensor(start_pos):
            # a position on the device (zoo.models.decoding, CUDA graphs): no host sync; the caller checks length
            positions = start_pos + torch.arange(n, device=input_ids.device)
        else:
            end = start_pos + n
            if self.cfg.position in ("learned", "sinusoidal") and end > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {end} tokens is longer than the position table "
                                 f"(model.max_seq_len={self.cfg.max_seq_len})")
            positions = torch.arange(start_pos, end, device=input_ids.device)
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        if self.type_emb is not None:
            tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_emb(tt)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None
        # per-example inputs that some cores read (Longformer's global tokens)
        context = {"global_attention_mask": global_attention_mask.bool()} if global_attention_mask is not None else None
        return x, positions, key_padding_mask, context

    def run_block(self, i: int, x, positions, key_padding_mask, cache, context):
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.blocks[i], x, positions, key_padding_mask, None, context,
                                                     use_reentrant=False)
        return self.blocks[i](x, positions, key_padding_mask, cache[i] if cache is not None else None, context)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_pos: int = 0, cache=None,
                global_attention_mask=None):
        x, positions, key_padding_mask, context = self.embed(input_ids, attention_mask, token_type_ids, start_pos,
                                                             global_attention_mask)
        if self.cfg.reversible:  # the Reformer: activations recomputed in backward, output 2 * d_model wide
            if cache is not None:
                raise ValueError("model.reversible=true has no KV cache: generation recomputes the context")
            x = reversible_stack(self.blocks, x, positions, key_padding_mask, context, self.cfg.ffn_chunks)
            return self.norm(x) if self.norm is not None else x
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, positions, key_padding_mask, cache, context)
        return self.norm(x) if self.norm is not None else x


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> activation -> norm, then the (tied) vocabulary projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_width, cfg.d_model)
        self.act = activation(cfg.activation)
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)

    def forward(self, x):
        return self.norm(self.act(self.dense(x)))


class ClassificationHead(nn.Module):
    """BERT's pooler (dense + tanh) and a linear classifier, on the first token (model.pool=cls) or on the mean
    over the unpadded tokens (mean: LRA's image tasks, `classifier_pool = 'MEAN'`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mean = cfg.pool == "mean"
        self.pool = nn.Linear(cfg.hidden_width, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)

    def forward(self, hidden, attention_mask=None):
        if not self.mean:
            pooled = hidden[:, 0]
        elif attention_mask is None:
            pooled = hidden.mean(1)
        else:
            keep = attention_mask[..., None].to(hidden.dtype)
            pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1)
        return self.classifier(self.drop(torch.tanh(self.pool(pooled))))


class ZooModel(nn.Module):
    """Trunk + heads. `model(input_ids)` gives vocabulary logits (batch, seq, vocab) for both
    decoders (next-token) and encoders (masked-token); `model.classify(...)` gives (batch, num_labels)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.retrieval:
            from zoo.models.retro import RetroTransformer  # it subclasses Transformer: imported here, not above

            self.trunk = RetroTransformer(cfg)
        else:
            self.trunk = TransformerXL(cfg) if cfg.recurrence == "xl" else Transformer(cfg)
        self.mlm_head = MLMHead(cfg) if cfg.arch == "encoder" else None
        # BERT's and the Reformer's LM heads have a bias; GPT-2's has none
        width = cfg.d_model if self.mlm_head is not None else cfg.hidden_width  # the MLM transform narrows it
        self.lm_head = nn.Linear(width, cfg.vocab_size, bias=cfg.arch == "encoder" or cfg.reversible)
        self.cls_head = ClassificationHead(cfg) if cfg.num_labels > 0 else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers) so the residual stream stays O(1)
            if name.endswith(("attn.out.weight", "ffn.proj.weight", "ffn.w2.weight")):
                nn.init.normal_(p, std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.trunk.tok_emb.weight

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None, start_pos=0, cache=None,
                      global_attention_mask=None, neighbours=None, neighbour_mask=None):
        if neighbours is None:
            return self.trunk(input_ids, attention_mask, token_type_ids, start_pos, cache, global_attention_mask)
        if not self.cfg.retrieval:
            raise ValueError("neighbours were given to a model built without retrieval (model.retrieval=false)")
        return self.trunk(input_ids, attention_mask, token_type_ids, start_pos, cache, global_attention_mask,
                          neighbours=neighbours, neighbour_mask=neighbour_mask)

    def logits(self, hidden):
        if self.mlm_head is not None:
            hidden = self.mlm_head(hidden)
        return self.lm_head(hidden)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_pos: int = 0, cache=None,
                global_attention_mask=None, neighbours=None, neighbour_mask=None):
        """neighbours / neighbour_mask (b, chunks, k, tokens): RETRO's retrieved neighbours (model.retrieval)."""
        return self.logits(self.hidden_states(input_ids, attention_mask, token_type_ids, start_pos, cache,
                                              global_attention_mask, neighbours, neighbour_mask))

    def classify(self, input_ids, attention_mask=None, token_type_ids=None, global_attention_mask=None):
        if self.cls_head is None:
            raise ValueError("this model has no classification head: build it with model.num_labels > 0")
        if global_attention_mask is None and getattr(self.trunk.blocks[0].attn.core, "uses_global_tokens", False):
            # Longformer's recipe: the pooled first token attends to the whole sequence
            global_attention_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            global_attention_mask[:, 0] = True
        return self.cls_head(self.hidden_states(input_ids, attention_mask, token_type_ids,
                                                global_attention_mask=global_attention_mask), attention_mask)

    def new_cache(self) -> list[dict]:
        """An empty KV cache, one dict per layer, for incremental decoding."""
        if self.cfg.recurrence == "xl":  # the XL memory, at least as long as the window a recompute would see
            return self.trunk.new_memory(max(self.cfg.eval_mem_len, self.cfg.max_seq_len))
        if self.cfg.arch != "decoder" or self.cfg.reversible or not self.trunk.blocks[0].attn.core.supports_kv_cache:
            raise ValueError(f"attention.core={self.cfg.attention['core']!r} in a {self.cfg.arch} has no KV cache")
        return [{} for _ in self.trunk.blocks]

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.trunk.blocks if isinstance(b.ffn, MoE)]

    def moe_losses(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(load-balancing loss, router z-loss) of the last forward, unweighted; None without MoE layers.
        The load-balancing loss equals HF MixtralForCausalLM's `aux_loss` (see zoo.blocks.moe.combine_aux)."""
        layers = [m for m in self.moe_layers() if m.stats is not None]
        return combine_aux([m.stats for m in layers], self.cfg.n_experts) if layers else None

    def aux_loss(self) -> torch.Tensor | None:
        """What training adds to the token loss: moe_aux_coef * load balancing + moe_z_coef * z-loss."""
        losses = self.moe_losses()
        if losses is None:
            return None
        lb, z = losses
        return self.cfg.moe_aux_coef * lb + self.cfg.moe_z_coef * z

    def expert_load(self) -> torch.Tensor | None:
        """(MoE layers, experts): each layer's share of routed assignments per expert in the last forward."""
        layers = self.moe_layers()
        return torch.stack([m.expert_load() for m in layers]) if layers and layers[0].stats is not None else None

    def num_params(self, exclude_embeddings: bool = False, active: bool = False) -> int:
        """All parameters, or with active=True those one token uses (top-k of each MoE layer's experts)."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            for m in self.moe_layers():
                n -= (m.w13.numel() + m.w2.numel()) * (m.n_experts - m.top_k) // m.n_experts
        if exclude_embeddings:
            n -= self.trunk.tok_emb.weight.numel()
            if self.trunk.pos_emb is not None and hasattr(self.trunk.pos_emb, "weight"):
                n -= self.trunk.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B:
        6 * params (excluding embeddings) + 12 * layers * heads * head_dim * seq_len (attention)."""
        c = self.cfg
        n = self.num_params(exclude_embeddings=True, active=True)  # an MoE token runs only its top-k experts
        if c.share_layers:  # parameters() counts the shared block once; a token passes through it n_layers times
            n += (c.n_layers - 1) * sum(p.numel() for p in self.trunk.blocks[0].parameters())
        if not c.tie_embeddings:
            n -= self.lm_head.weight.numel()  # counted below with the tied case
        n += c.vocab_size * c.d_model  # the LM head matmul
        attn = 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
        if c.causal:
            attn //= 2  # causal kernels skip the masked half
        return 6 * n + attn

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True, retrieve=None,
                 kv_cache: str = "dynamic"):
        """Sample continuations. temperature=0 is greedy. Uses the KV cache when the core has one.
        retrieve (RETRO): chunks (l, chunk_len) LongTensor -> (neighbours (l, k, r), mask (l, k, r)), called once
        per completed chunk; the context is then recomputed at each step (neighbours change what it sees).
        kv_cache: "dynamic", "static" (preallocated) or "cuda_graph" (static, decoding steps replayed as a CUDA
        graph): see zoo.models.decoding."""
        if self.cfg.arch != "decoder":
            raise ValueError("generate() needs a decoder (model.arch=decoder)")
        decoding.check_static(self, kv_cache, input_ids.shape[1], max_new_tokens)
        if kv_cache != "dynamic" and (retrieve is not None or not use_cache):
            raise ValueError(f"kv_cache={kv_cache!r} with {'retrieve=' if retrieve is not None else 'use_cache=False'}:"
                             f" use kv_cache='dynamic'")
        if retrieve is not None:
            if not self.cfg.retrieval:
                raise ValueError("retrieve= needs a model built with model.retrieval=true")
            from zoo.models.retro import ChunkNeighbours

            return self._generate(input_ids, max_new_tokens, temperature, top_k, generator, None,
                                  ChunkNeighbours(retrieve, self.cfg.chunk_len))
        # cores without a cache (lsh) and the reversible stack recompute the context at each step
        has_cache = self.cfg.recurrence == "xl" or (self.trunk.blocks[0].attn.core.supports_kv_cache
                                                    and not self.cfg.reversible)
        cache = self.new_cache() if use_cache and has_cache else None
        for m in self.moe_layers():  # no routing statistics: nothing reads them while decoding
            m.track_stats, m.stats = False, None
        try:
            if kv_cache != "dynamic":
                return self._generate_static(input_ids, max_new_tokens, temperature, top_k, generator,
                                             kv_cache == "cuda_graph")
            return self._generate(input_ids, max_new_tokens, temperature, top_k, generator, cache)
        finally:
            for m in self.moe_layers():
                m.track_stats = True

    def _generate(self, input_ids, max_new_tokens, temperature, top_k, generator, cache, retrieval=None):
        out = input_ids
        step_input, start = input_ids, 0
        for _ in range(max_new_tokens):
            if cache is None:
                ctx = out[:, -self.cfg.max_seq_len:]
                kw = {}
                if retrieval is not None:  # a window that starts on a chunk boundary, its chunks' neighbours
                    ctx, kw = retrieval(out, self.cfg.max_seq_len)
                logits = self.logits(self.hidden_states(ctx, **kw)[:, -1])  # the head on the last position only
            else:
                # (an XL memory never fills: it slides, keeping its last positions)
                if self.cfg.recurrence != "xl" and start + step_input.shape[1] > self.cfg.max_seq_len:
                    # the cache is full: fall back to recomputing the last window
                    cache = self.new_cache()
                    step_input, start = out[:, -self.cfg.max_seq_len + 1:], 0
                logits = self.logits(self.hidden_states(step_input, start_pos=start, cache=cache)[:, -1])
                start += step_input.shape[1]
            nxt = self._sample(logits, temperature, top_k, generator)
            out = torch.cat([out, nxt], dim=1)
            step_input = nxt
        return out

    def _generate_static(self, input_ids, max_new_tokens, temperature, top_k, generator, graphed: bool):
        """Prefill eagerly into preallocated buffers, then one token per step (replayed as a CUDA graph when
        graphed): zoo.models.decoding."""
        n0 = input_ids.shape[1]
        prefill = self.new_cache()
        logits = self.logits(self.hidden_states(input_ids, cache=prefill)[:, -1])
        cache = decoding.static_cache(self, n0 + max_new_tokens, input_ids.device, prefill)
        pos = cache[0]["pos"]
        step = None
        out = input_ids
        for i in range(max_new_tokens):
            nxt = self._sample(logits, temperature, top_k, generator)
            out = torch.cat([out, nxt], dim=1)
            if i == max_new_tokens - 1:
                break
            pos.fill_(n0 + i)  # where this token's keys and values go, and its position
            if graphed:
                step = step or decoding.GraphedStep(self, cache, input_ids.shape[0])
                logits = step(nxt)
            else:
                logits = self.logits(self.hidden_states(nxt, start_pos=pos, cache=cache)[:, -1])
        return out

    @staticmethod
    def _sample(logits, temperature, top_k, generator):
        if temperature == 0:
            return logits.argmax(-1, keepdim=True)
        logits = logits.float() / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)
