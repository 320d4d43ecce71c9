"""Hugging Face Reformer (ReformerModelWithLMHead) import and export: config and state dict, both ways.

The zoo's model=reformer is HF's layout: a reversible two-stream stack (y1 = x1 + Attn(x2), y2 = x2 + FFN(y1)),
pre-norm sub-layers, shared-QK LSH attention without biases, a final LayerNorm over both streams (2 * d_model)
and an untied LM head with a bias. What differs, and how the conversion bridges it:
- the zoo's attention projections carry biases when model.bias=true (the FFN and norms need them): import sets
  them to zero; export refuses non-zero ones.
- HF's `hash_seed` gives every layer the same rotations, drawn with the global RNG; the zoo core draws the same
  numbers from a private generator with `seed_per_layer: false`. A config without `hash_seed` draws new
  rotations at every call in HF, which nothing can reproduce: import then fixes seed 0 and warns.
- HF's local-attention layers (`attn_layers: local`), factorised bucket counts and extra look-ahead chunks have
  no zoo counterpart and are refused by name.
"""
from __future__ import annotations

import warnings

import torch

from zoo.checkpoint import CheckpointError
from zoo.models import ModelConfig, ZooModel

_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}
_ACT_BACK = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}


def _refuse(field: str, value, allowed: str):
    raise ValueError(f"reformer config {field}={value!r} has no Attention Zoo counterpart (supported: {allowed})")


def _config(c: dict) -> dict:
    layers = c.get("attn_layers", ["local", "lsh", "local", "lsh"])
    if any(kind != "lsh" for kind in layers):
        _refuse("attn_layers", layers, "every layer 'lsh'")
    if not c.get("is_decoder", False):
        _refuse("is_decoder", c.get("is_decoder"), "true (ReformerModelWithLMHead)")
    nb = c.get("num_buckets")
    if isinstance(nb, (list, tuple)):
        if len(nb) != 1:
            _refuse("num_buckets", nb, "one integer")
        nb = nb[0]
    if nb is None:
        _refuse("num_buckets", nb, "an even integer (HF picks one at the first call otherwise)")
    for field, want in (("lsh_num_chunks_before", 1), ("lsh_num_chunks_after", 0)):
        if c.get(field, want) != want:
            _refuse(field, c.get(field), repr(want))
    act = c.get("hidden_act", "relu")
    if act not in _ACT:
        _refuse("hidden_act", act, ", ".join(map(repr, _ACT)))
    seed = c.get("hash_seed")
    if seed is None:
        warnings.warn("this reformer config has no hash_seed: HF draws new LSH rotations at every call; "
                      "the zoo model fixes them with seed 0", stacklevel=3)
        seed = 0
    d = c["hidden_size"]
    cfg = dict(
        name="reformer", arch="decoder", vocab_size=c["vocab_size"], d_model=d, n_layers=len(layers),
        n_heads=c["num_attention_heads"], head_dim=c.get("attention_head_size", 64), d_ff=c["feed_forward_size"],
        ffn="mlp", activation=_ACT[act], norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-12),
        norm_position="pre", position="learned", shared_qk=True, tie_embeddings=False, reversible=True, bias=True,
        dropout=c.get("hidden_dropout_prob", 0.0), attn_dropout=c.get("lsh_attention_probs_dropout_prob", 0.0),
        init_std=c.get("initializer_range", 0.02),
        attention={"core": "lsh", "n_hashes": c.get("num_hashes", 1), "n_buckets": nb,
                   "chunk_length": c.get("lsh_attn_chunk_length", 64), "seed": seed, "seed_per_layer": False},
    )
    if c.get("axial_pos_embds", True):
        shape, dims = list(c.get("axial_pos_shape", [64, 64])), list(c.get("axial_pos_embds_dim", [64, 192]))
        cfg.update(axial_shape=shape, axial_dims=dims, max_seq_len=shape[0] * shape[1])
    else:
        cfg["max_seq_len"] = c.get("max_position_embeddings", 4096)
    return cfg


def _table(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(zoo name, HF names concatenated along dim 0)."""
    e = "reformer.embeddings"
    rows = [("trunk.tok_emb.weight", (f"{e}.word_embeddings.weight",))]
    if cfg.axial_shape:
        rows += [(f"trunk.pos_emb.weights.{i}", (f"{e}.position_embeddings.weights.{i}",)) for i in (0, 1)]
    else:
        rows.append(("trunk.pos_emb.weight", (f"{e}.position_embeddings.embedding.weight",)))
    for i in range(cfg.n_layers):
        z, h = f"trunk.blocks.{i}", f"reformer.encoder.layers.{i}"
        for p in ("weight", "bias"):
            rows += [(f"{z}.norm1.{p}", (f"{h}.attention.layer_norm.{p}",)),
                     (f"{z}.norm2.{p}", (f"{h}.feed_forward.layer_norm.{p}",)),
                     (f"{z}.ffn.fc.{p}", (f"{h}.feed_forward.dense.dense.{p}",)),
                     (f"{z}.ffn.proj.{p}", (f"{h}.feed_forward.output.dense.{p}",))]
        rows += [(f"{z}.attn.qkv.weight", (f"{h}.attention.self_attention.query_key.weight",
                                           f"{h}.attention.self_attention.value.weight")),
                 (f"{z}.attn.out.weight", (f"{h}.attention.output.dense.weight",))]
    rows += [("trunk.norm.weight", ("reformer.encoder.layer_norm.weight",)),
             ("trunk.norm.bias", ("reformer.encoder.layer_norm.bias",)),
             ("lm_head.weight", ("lm_head.decoder.weight",)), ("lm_head.bias", ("lm_head.bias",))]
    return rows


def _zero_biases(cfg: ModelConfig) -> list[str]:
    return [f"trunk.blocks.{i}.attn.{m}.bias" for i in range(cfg.n_layers) for m in ("qkv", "out")]


def from_hf_reformer(config, state_dict: dict) -> ZooModel:
    """ReformerModelWithLMHead weights -> ZooModel; config is config.json's dict or a ReformerConfig."""
    c = config if isinstance(config, dict) else config.to_dict()
    cfg = ModelConfig.from_dict(_config(c))
    model = ZooModel(cfg)
    state = dict(state_dict)
    # HF's decoder adds `lm_head.decoder.bias`; `lm_head.bias` is its tied twin in older files (and the only one
    # some keep), a separate, unused parameter in transformers 5
    if "lm_head.decoder.bias" in state:
        state["lm_head.bias"] = state.pop("lm_head.decoder.bias")
    rows = _table(cfg)
    missing = sorted({h for _, hs in rows for h in hs if h not in state})
    if missing:
        raise CheckpointError(f"reformer weights are missing {len(missing)} tensor(s) its config needs: {missing[:8]}")
    used = {h for _, hs in rows for h in hs}
    unexpected = sorted(k for k in state if k not in used)
    if unexpected:
        raise CheckpointError(f"reformer weights hold tensor(s) with no place in the zoo model: {unexpected[:8]}")
    ours, expected = {}, model.state_dict()
    for zoo_name, hs in rows:
        t = torch.cat([state[h] for h in hs], dim=0) if len(hs) > 1 else state[hs[0]]
        if tuple(t.shape) != tuple(expected[zoo_name].shape):
            raise CheckpointError(f"reformer weights do not fit config.json: {', '.join(hs)} {tuple(t.shape)} "
                                  f"cannot make {zoo_name} of shape {tuple(expected[zoo_name].shape)}")
        ours[zoo_name] = t
    for name in _zero_biases(cfg):
        ours[name] = torch.zeros_like(expected[name])
    model.load_state_dict(ours, strict=True)
    return model.eval()


def check_exportable(model: ZooModel) -> None:
    """Every config field (and weight) that HF's ReformerConfig cannot express, in one error."""
    cfg = model.cfg
    a = cfg.attention
    need = {"arch": "decoder", "reversible": True, "ffn": "mlp", "norm": "layernorm", "norm_position": "pre",
            "position": "learned", "shared_qk": True, "bias": True, "embed_norm": False, "final_norm": True,
            "type_vocab_size": 0, "num_labels": 0, "tie_embeddings": False}
    bad = [f"model.{f}={getattr(cfg, f)!r} (needs {v!r})" for f, v in need.items() if getattr(cfg, f) != v]
    if a["core"] != "lsh":
        bad.append(f"model.attention.core={a['core']!r} (needs 'lsh')")
    else:
        if a.get("seed_per_layer", True):
            bad.append("model.attention.seed_per_layer=true (HF's hash_seed is one for all layers: needs false)")
        if a.get("n_buckets") is None:
            bad.append("model.attention.n_buckets=null (needs an integer)")
    if cfg.activation not in _ACT_BACK:
        bad.append(f"model.activation={cfg.activation!r} (needs one of {', '.join(_ACT_BACK)})")
    state = model.state_dict()
    nonzero = [n for n in _zero_biases(cfg) if n in state and bool(state[n].any())]
    if nonzero:
        bad.append(f"non-zero attention biases {nonzero[:2]} (HF's LSH projections have none)")
    if bad:
        raise ValueError(f"model {cfg.name!r} has no Hugging Face reformer counterpart: " + "; ".join(bad))


def to_hf_reformer(model: ZooModel) -> tuple[dict, dict]:
    """ZooModel -> (config.json dict, ReformerModelWithLMHead state dict)."""
    check_exportable(model)
    c, a = model.cfg, model.cfg.attention
    config = dict(
        model_type="reformer", architectures=["ReformerModelWithLMHead"], vocab_size=c.vocab_size,
        hidden_size=c.d_model, num_attention_heads=c.n_heads, attention_head_size=c.head_dim,
        num_hidden_layers=c.n_layers, attn_layers=["lsh"] * c.n_layers, feed_forward_size=c.d_ff,
        hidden_act=_ACT_BACK[c.activation], layer_norm_eps=c.norm_eps, is_decoder=True,
        num_hashes=a.get("n_hashes", 2), num_buckets=a["n_buckets"], lsh_attn_chunk_length=a.get("chunk_length", 64),
        lsh_num_chunks_before=1, lsh_num_chunks_after=0, hash_seed=a.get("seed", 0),
        hidden_dropout_prob=c.dropout, lsh_attention_probs_dropout_prob=c.attn_dropout,
        axial_pos_embds=bool(c.axial_shape), max_position_embeddings=c.max_seq_len,
        initializer_range=c.init_std, tie_word_embeddings=False,
    )
    if c.axial_shape:
        config.update(axial_pos_shape=list(c.axial_shape), axial_pos_embds_dim=list(c.axial_dims),
                      max_position_embeddings=c.axial_shape[0] * c.axial_shape[1])
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {}
    for zoo_name, hs in _table(c):
        parts = ours[zoo_name].chunk(len(hs)) if len(hs) > 1 else (ours[zoo_name],)
        state.update(zip(hs, parts))
    state["lm_head.decoder.bias"] = state["lm_head.bias"]
    # own, contiguous storage: safetensors refuses views and shared tensors
    return config, {k: v.contiguous().clone() for k, v in state.items()}
