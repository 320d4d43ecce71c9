"""Hugging Face Mixtral (MixtralForCausalLM) import and export: config and state dict, both ways.

Mixtral checkpoints come in two spellings: the original one (`block_sparse_moe.experts.{j}.w1/w2/w3`, one
tensor per expert; what the hub holds, and what transformers 5 still writes on save) and transformers 5's
in-memory one (`mlp.gate`, `mlp.experts.gate_up_proj` (E, 2*ff, d) and `mlp.experts.down_proj` (E, d, ff)).
Import reads both; export writes the original, which every transformers version (and vLLM) loads.
The zoo's MoE stores its experts in the fused layout, so the conversion is a rename and a stack.

HF applies router jitter to the experts' input as well as the router's (ours: router only); it only acts in
training, and HF's default is 0.
"""
from __future__ import annotations

import re

import torch

from zoo.checkpoint import CheckpointError
from zoo.models import ModelConfig, ZooModel

_LEGACY_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight")


def _check(c: dict, field: str, default, allowed: tuple):
    value = c.get(field, default)
    if value not in allowed:
        raise ValueError(f"mixtral config {field}={value!r} has no Attention Zoo counterpart "
                         f"(supported: {', '.join(map(repr, allowed))})")
    return value


def _rope_theta(c: dict) -> float:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"mixtral config rope_parameters.rope_type={kind!r} has no Attention Zoo counterpart "
                         "(supported: 'default')")
    return float(rope.get("rope_theta", c.get("rope_theta", 1e6)))


def config_from_hf(c: dict) -> dict:
    """MixtralConfig's dict -> the zoo's model config dict."""
    _check(c, "hidden_act", "silu", ("silu", "swish"))
    d, heads = c.get("hidden_size", 4096), c.get("num_attention_heads", 32)
    window = c.get("sliding_window")
    attention = {"core": "causal", "backend": "auto"}
    if window:  # Mistral's sliding window: query i sees keys i - W < j <= i, as the zoo's sliding_window core
        attention = {"core": "sliding_window", "backend": "auto", "window": int(window)}
    return dict(
        name="mixtral", arch="decoder", vocab_size=c.get("vocab_size", 32000),
        max_seq_len=c.get("max_position_embeddings", 4096 * 32), d_model=d, n_layers=c.get("num_hidden_layers", 32),
        n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or d // heads,
        d_ff=c.get("intermediate_size", 14336), ffn="moe", n_experts=c.get("num_local_experts", 8),
        moe_top_k=c.get("num_experts_per_tok", 2), moe_aux_coef=c.get("router_aux_loss_coef", 0.001),
        moe_jitter=c.get("router_jitter_noise", 0.0) or 0.0, moe_capacity_factor=None, norm="rmsnorm",
        norm_eps=c.get("rms_norm_eps", 1e-5), norm_position="pre", embed_norm=False, final_norm=True,
        position="rope", rope_base=_rope_theta(c), type_vocab_size=0, bias=False,
        tie_embeddings=c.get("tie_word_embeddings", False), dropout=0.0,
        attn_dropout=c.get("attention_dropout", 0.0), attention=attention,
        init_std=c.get("initializer_range", 0.02),
    )


def _fuse_legacy_experts(state: dict) -> dict:
    """Per-expert w1/w2/w3 tensors -> the fused gate_up_proj / down_proj of each layer."""
    out, experts = {}, {}
    for k, v in state.items():
        m = _LEGACY_EXPERT.fullmatch(k)
        if m:
            experts.setdefault(int(m[1]), {}).setdefault(m[3], {})[int(m[2])] = v
        else:
            out[k.replace(".block_sparse_moe.", ".mlp.")] = v
    for layer, ws in experts.items():
        n = max(max(w) for w in ws.values()) + 1
        missing = [f"{w}[{j}]" for w in ("w1", "w2", "w3") for j in range(n) if j not in ws.get(w, {})]
        if missing:
            raise CheckpointError(f"mixtral layer {layer} lacks expert weights {missing[:8]}")
        stack = {w: torch.stack([ws[w][j] for j in range(n)]) for w in ws}
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([stack["w1"], stack["w3"]], dim=1)
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = stack["w2"]
    return out


def _table(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(zoo name, HF names (fused layout) concatenated along dim 0) for every parameter."""
    rows = [("trunk.tok_emb.weight", ("model.embed_tokens.weight",)), ("trunk.norm.weight", ("model.norm.weight",))]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ("lm_head.weight",)))
    for i in range(cfg.n_layers):
        z, h = f"trunk.blocks.{i}", f"model.layers.{i}"
        rows += [
            (f"{z}.norm1.weight", (f"{h}.input_layernorm.weight",)),
            (f"{z}.attn.qkv.weight", tuple(f"{h}.self_attn.{p}_proj.weight" for p in "qkv")),
            (f"{z}.attn.out.weight", (f"{h}.self_attn.o_proj.weight",)),
            (f"{z}.norm2.weight", (f"{h}.post_attention_layernorm.weight",)),
            (f"{z}.ffn.router.weight", (f"{h}.mlp.gate.weight",)),
            (f"{z}.ffn.w13", (f"{h}.mlp.experts.gate_up_proj",)),
            (f"{z}.ffn.w2", (f"{h}.mlp.experts.down_proj",)),
        ]
    return rows


def from_hf_mixtral(config, state_dict: dict) -> ZooModel:
    """MixtralForCausalLM (or MixtralModel) weights, either spelling -> ZooModel; config: config.json's dict or
    a MixtralConfig."""
    c = config.to_dict() if hasattr(config, "to_dict") else config
    cfg = ModelConfig.from_dict(config_from_hf(c))
    state = {(k if k.startswith(("model.", "lm_head.")) else "model." + k): v  # MixtralModel omits 'model.'
             for k, v in state_dict.items()}
    state = _fuse_legacy_experts(state)
    model = ZooModel(cfg)
    rows = _table(cfg)
    needed = {h for _, hs in rows for h in hs}
    missing = sorted(needed - set(state))
    if missing:
        raise CheckpointError(f"mixtral weights are missing {len(missing)} tensor(s) its config needs: {missing[:8]}")
    unexpected = sorted(set(state) - needed - {"lm_head.weight"})  # a tied head's copy is ignored
    if unexpected:
        raise CheckpointError(f"mixtral weights hold tensor(s) with no place in the zoo model: {unexpected[:8]}")
    ours, expected = {}, model.state_dict()
    for zoo_name, hs in rows:
        parts = [state[h] for h in hs]
        t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if t.shape != expected[zoo_name].shape:
            raise CheckpointError(f"mixtral weights do not fit config.json: {', '.join(hs)} "
                                  f"{[tuple(p.shape) for p in parts]} cannot make {zoo_name} of shape "
                                  f"{tuple(expected[zoo_name].shape)}")
        ours[zoo_name] = t
    model.load_state_dict(ours, strict=False)  # a tied lm_head.weight is the embedding already
    return model.eval()


def check_exportable(cfg: ModelConfig) -> None:
    """Every config field whose value HF's MixtralConfig cannot express, in one error."""
    core = cfg.attention["core"]
    need = {"arch": "decoder", "ffn": "moe", "norm": "rmsnorm", "position": "rope", "bias": False,
            "shared_qk": False, "norm_position": "pre", "embed_norm": False, "final_norm": True,
            "type_vocab_size": 0, "num_labels": 0, "moe_capacity_factor": None}
    bad = [f"model.{f}={getattr(cfg, f)!r} (needs {v!r})" for f, v in need.items() if getattr(cfg, f) != v]
    if core not in ("causal", "sliding_window"):
        bad.append(f"model.attention.core={core!r} (needs 'causal' or 'sliding_window')")
    if cfg.attention.get("dilation", 1) != 1:
        bad.append(f"model.attention.dilation={cfg.attention['dilation']!r} (needs 1)")
    extra = sorted(set(cfg.attention) - {"core", "backend", "window", "dilation", "impl"})
    if extra:
        bad.append(f"model.attention options {extra} (needs none beyond window)")
    if bad:
        raise ValueError(f"model {cfg.name!r} has no Hugging Face mixtral counterpart: " + "; ".join(bad))


def to_hf_mixtral(model: ZooModel) -> tuple[dict, dict]:
    """ZooModel -> (config.json dict, state dict in the original per-expert spelling)."""
    c = model.cfg
    check_exportable(c)
    config = dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=c.vocab_size, hidden_size=c.d_model,
        intermediate_size=c.d_ff, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, hidden_act="silu",
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base}, rope_theta=c.rope_base,
        sliding_window=c.attention.get("window") if c.attention["core"] == "sliding_window" else None,
        attention_dropout=c.attn_dropout, num_local_experts=c.n_experts, num_experts_per_tok=c.moe_top_k,
        router_aux_loss_coef=c.moe_aux_coef, router_jitter_noise=c.moe_jitter, output_router_logits=False,
        tie_word_embeddings=c.tie_embeddings, initializer_range=c.init_std, bos_token_id=None, eos_token_id=None,
    )
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {}
    qkv_sizes = [c.n_heads * c.head_dim] + [c.n_kv_heads * c.head_dim] * 2
    for zoo_name, hs in _table(c):
        parts = ours[zoo_name].split(qkv_sizes) if len(hs) > 1 else (ours[zoo_name],)
        state.update(zip(hs, parts))
    for i in range(c.n_layers):  # the fused experts, spelt per expert
        h = f"model.layers.{i}"
        gate_up, down = state.pop(f"{h}.mlp.experts.gate_up_proj"), state.pop(f"{h}.mlp.experts.down_proj")
        state[f"{h}.block_sparse_moe.gate.weight"] = state.pop(f"{h}.mlp.gate.weight")
        for j in range(c.n_experts):
            w1, w3 = gate_up[j].chunk(2, dim=0)
            state[f"{h}.block_sparse_moe.experts.{j}.w1.weight"] = w1
            state[f"{h}.block_sparse_moe.experts.{j}.w3.weight"] = w3
            state[f"{h}.block_sparse_moe.experts.{j}.w2.weight"] = down[j]
    # own, contiguous storage: safetensors refuses views and shared tensors
    return config, {k: v.contiguous().clone() for k, v in state.items()}
