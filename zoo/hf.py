"""Hugging Face import/export for GPT-2 (GPT2LMHeadModel), BERT, Longformer and BigBird (*ForMaskedLM /
*ForSequenceClassification) and Mixtral (MixtralForCausalLM, in zoo.hf_mixtral).

Pure state-dict conversion: `transformers` is not needed at runtime. Each architecture is one table
of (zoo parameter, HF parameter(s), transpose?) read in one direction to import and in the other to
export, so the two cannot drift apart. Loading never executes code: safetensors, or a weights-only
`torch.load` of pytorch_model.bin.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from zoo.checkpoint import CheckpointError
from zoo.hf_mixtral import from_hf_mixtral, to_hf_mixtral
from zoo.hf_reformer import from_hf_reformer, to_hf_reformer
from zoo.models import ModelConfig, ZooModel

SUPPORTED = ("gpt2", "bert", "longformer", "big_bird", "mixtral", "reformer")
_LM_KEY = {"gpt2": "lm_head.weight", "bert": "cls.predictions.decoder.weight",
           "big_bird": "cls.predictions.decoder.weight", "longformer": "lm_head.decoder.weight"}
# BERT-layout encoders: where each keeps its trunk, MLM head (dense, norm, bias) and classification head
# (dense + tanh on the first token, then the classifier). BigBird and Longformer are BERT/RoBERTa with
# another attention core (Longformer adds global q/k/v projections).
_ENCODERS = {
    "bert": ("bert", ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias"),
             ("bert.pooler.dense", "classifier")),
    "big_bird": ("bert", ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                          "cls.predictions.bias"), ("classifier.dense", "classifier.out_proj")),
    "longformer": ("longformer", ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
                   ("classifier.dense", "classifier.out_proj")),
}
_ACT_FROM_HF = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_python_tanh": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _check_hf(model_type: str, c: dict, field: str, default, allowed: tuple):
    value = c.get(field, default)
    if value not in allowed:
        raise ValueError(f"{model_type} config {field}={value!r} has no Attention Zoo counterpart "
                         f"(supported: {', '.join(map(repr, allowed))})")
    return value


def _activation(model_type: str, c: dict, field: str, default: str) -> str:
    return _ACT_FROM_HF[_check_hf(model_type, c, field, default, tuple(_ACT_FROM_HF))]


def _table(cfg: ModelConfig, kind: str, mlm: bool, cls: bool) -> list[tuple[str, tuple[str, ...], bool]]:
    """(zoo name, HF names concatenated along dim 0, transpose each HF tensor) for every converted parameter.
    HF names are those of GPT2LMHeadModel / BertFor*. A tied LM head is the embedding: HF files may omit it."""
    rows = [("lm_head.weight", (_LM_KEY[kind],), False)] if not cfg.tie_embeddings else []

    def lin(zoo, hf, transpose=False):  # a Linear or LayerNorm: weight and bias
        for p in ("weight", "bias"):
            rows.append((f"{zoo}.{p}", tuple(f"{h}.{p}" for h in hf), transpose))

    if kind == "gpt2":
        rows += [("trunk.tok_emb.weight", ("transformer.wte.weight",), False),
                 ("trunk.pos_emb.weight", ("transformer.wpe.weight",), False)]
        for i in range(cfg.n_layers):
            z, h = f"trunk.blocks.{i}", f"transformer.h.{i}"
            lin(f"{z}.norm1", (f"{h}.ln_1",))
            lin(f"{z}.attn.qkv", (f"{h}.attn.c_attn",), True)  # Conv1D stores (in, out)
            lin(f"{z}.attn.out", (f"{h}.attn.c_proj",), True)
            lin(f"{z}.norm2", (f"{h}.ln_2",))
            lin(f"{z}.ffn.fc", (f"{h}.mlp.c_fc",), True)
            lin(f"{z}.ffn.proj", (f"{h}.mlp.c_proj",), True)
        lin("trunk.norm", ("transformer.ln_f",))
        return rows
    prefix, mlm_names, cls_names = _ENCODERS[kind]
    e = f"{prefix}.embeddings"
    rows += [("trunk.tok_emb.weight", (f"{e}.word_embeddings.weight",), False),
             ("trunk.pos_emb.weight", (f"{e}.position_embeddings.weight",), False),
             ("trunk.type_emb.weight", (f"{e}.token_type_embeddings.weight",), False)]
    lin("trunk.emb_norm", (f"{e}.LayerNorm",))
    for i in range(cfg.n_layers):
        z, h = f"trunk.blocks.{i}", f"{prefix}.encoder.layer.{i}"
        lin(f"{z}.attn.qkv", tuple(f"{h}.attention.self.{n}" for n in ("query", "key", "value")))
        if kind == "longformer":
            lin(f"{z}.attn.core.global_qkv", tuple(f"{h}.attention.self.{n}_global" for n in ("query", "key", "value")))
        lin(f"{z}.attn.out", (f"{h}.attention.output.dense",))
        lin(f"{z}.norm1", (f"{h}.attention.output.LayerNorm",))
        lin(f"{z}.ffn.fc", (f"{h}.intermediate.dense",))
        lin(f"{z}.ffn.proj", (f"{h}.output.dense",))
        lin(f"{z}.norm2", (f"{h}.output.LayerNorm",))
    if mlm:
        lin("mlm_head.dense", (mlm_names[0],))
        lin("mlm_head.norm", (mlm_names[1],))
        rows.append(("lm_head.bias", (mlm_names[2],), False))
    if cls:
        lin("cls_head.pool", (cls_names[0],))
        lin("cls_head.classifier", (cls_names[1],))
    return rows


def _canonical(kind: str, state: dict) -> dict:
    """HF names as GPT2LMHeadModel / BertFor* spell them, whichever class (or era) wrote the file."""
    out = {}
    for k, v in state.items():
        if kind == "gpt2":
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers saved by old transformers versions, not weights
            if not k.startswith(("transformer.", "lm_head.")):
                k = "transformer." + k  # written by GPT2Model
        else:
            if k.endswith("position_ids"):
                continue  # a buffer
            if k.startswith(("embeddings.", "encoder.", "pooler.")):
                k = f"{_ENCODERS[kind][0]}." + k  # written by BertModel / LongformerModel / BigBirdModel
            if "LayerNorm." in k:  # the original TF-converted checkpoints say gamma/beta
                k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            if k in ("cls.predictions.decoder.bias", "lm_head.decoder.bias"):
                k = _ENCODERS[kind][1][2]  # tied to the head's bias inside HF's LM head; some files keep only this one
        out.setdefault(k, v)
    return out


def _import(kind: str, zoo_cfg: dict, state: dict) -> ZooModel:
    state = _canonical(kind, state)
    if kind in _ENCODERS:
        prefix, mlm_names, cls_names = _ENCODERS[kind]
        cls = f"{cls_names[1]}.weight" in state
        if cls:
            zoo_cfg["num_labels"] = state[f"{cls_names[1]}.weight"].shape[0]
        # a *ForSequenceClassification has no MLM head: ours then keeps its initialisation
        mlm = f"{mlm_names[0]}.weight" in state
        # heads we have no place for: NSP (BertForPreTraining) and a pooler our head does not use
        ignored = ("cls.seq_relationship.",) + (() if cls and kind == "bert" else (f"{prefix}.pooler.",))
    else:
        mlm = cls = False
        ignored = ()
    cfg = ModelConfig.from_dict(zoo_cfg)
    model = ZooModel(cfg)
    rows = _table(cfg, kind, mlm, cls)
    missing = sorted({h for _, hs, _ in rows for h in hs if h not in state})
    if missing:
        raise CheckpointError(f"{kind} weights are missing {len(missing)} tensor(s) its config needs: {missing[:8]}")
    used = {h for _, hs, _ in rows for h in hs} | {_LM_KEY[kind]}  # a tied copy in the file is ignored
    unexpected = sorted(k for k in state if k not in used and not k.startswith(ignored))
    if unexpected:
        raise CheckpointError(f"{kind} weights hold tensor(s) with no place in the zoo model: {unexpected[:8]}")
    if not mlm and kind in _ENCODERS:
        warnings.warn(f"these {kind} weights have no MLM head: model(...) gives logits from an "
                      "untrained head; model.classify(...) is the converted one", stacklevel=3)
    ours, expected = {}, model.state_dict()
    for zoo, hs, transpose in rows:
        parts = [state[h].t() if transpose and state[h].dim() == 2 else state[h] for h in hs]
        shapes = [tuple(p.shape) for p in parts]
        if len({s[1:] for s in shapes}) > 1 or (sum(s[0] for s in shapes),) + shapes[0][1:] != expected[zoo].shape:
            raise CheckpointError(f"{kind} weights do not fit config.json: {', '.join(hs)} {shapes} cannot make "
                                  f"{zoo} of shape {tuple(expected[zoo].shape)}")
        ours[zoo] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    model.load_state_dict(ours, strict=False)  # the tied lm_head.weight and (if absent) the MLM head stay as built
    return model.eval()


def from_hf_gpt2(config: dict, state_dict: dict) -> ZooModel:
    """GPT2LMHeadModel (or GPT2Model) weights -> ZooModel; config is config.json's dict or a GPT2Config."""
    c = config.to_dict() if hasattr(config, "to_dict") else config
    _check_hf("gpt2", c, "add_cross_attention", False, (False,))
    _check_hf("gpt2", c, "scale_attn_weights", True, (True,))
    _check_hf("gpt2", c, "scale_attn_by_inverse_layer_idx", False, (False,))
    d = c.get("n_embd", 768)
    zoo_cfg = dict(
        name="gpt2", arch="decoder", vocab_size=c.get("vocab_size", 50257), max_seq_len=c.get("n_positions", 1024),
        d_model=d, n_layers=c.get("n_layer", 12), n_heads=c.get("n_head", 12), d_ff=c.get("n_inner") or 4 * d,
        ffn="mlp", activation=_activation("gpt2", c, "activation_function", "gelu_new"), norm="layernorm",
        norm_eps=c.get("layer_norm_epsilon", 1e-5), norm_position="pre", embed_norm=False, final_norm=True,
        position="learned", type_vocab_size=0, bias=True, tie_embeddings=c.get("tie_word_embeddings", True),
        dropout=c.get("resid_pdrop", 0.1), attn_dropout=c.get("attn_pdrop", 0.1),
        attention={"core": "causal", "backend": "auto"}, init_std=c.get("initializer_range", 0.02),
    )
    return _import("gpt2", zoo_cfg, state_dict)


def _encoder_cfg(kind: str, c: dict, **fields) -> dict:
    """The zoo config of a BERT-layout encoder from its HF config.json; `fields` are the family's own."""
    _check_hf(kind, c, "is_decoder", False, (False,))
    _check_hf(kind, c, "add_cross_attention", False, (False,))
    _check_hf(kind, c, "position_embedding_type", "absolute", ("absolute",))
    d = c.get("hidden_size", 768)
    return dict(
        arch="encoder", vocab_size=c.get("vocab_size", 30522), max_seq_len=c.get("max_position_embeddings", 512),
        d_model=d, n_layers=c.get("num_hidden_layers", 12), n_heads=c.get("num_attention_heads", 12),
        d_ff=c.get("intermediate_size", 4 * d), ffn="mlp", norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-12),
        norm_position="post", embed_norm=True, final_norm=False, position="learned",
        type_vocab_size=c.get("type_vocab_size", 2), bias=True, tie_embeddings=c.get("tie_word_embeddings", True),
        dropout=c.get("hidden_dropout_prob", 0.1), attn_dropout=c.get("attention_probs_dropout_prob", 0.1),
        init_std=c.get("initializer_range", 0.02), **fields)


def from_hf_bert(config: dict, state_dict: dict) -> ZooModel:
    """BertForMaskedLM / BertForSequenceClassification / BertForPreTraining / BertModel weights -> ZooModel."""
    c = config.to_dict() if hasattr(config, "to_dict") else config
    zoo_cfg = _encoder_cfg("bert", c, name="bert", activation=_activation("bert", c, "hidden_act", "gelu"),
                           attention={"core": "full", "backend": "auto"})
    return _import("bert", zoo_cfg, state_dict)


def _longformer_window(c: dict) -> int:
    w = c.get("attention_window", 512)
    if isinstance(w, (list, tuple)):
        if len(set(w)) != 1:
            raise ValueError(f"longformer config attention_window={w} differs per layer; the zoo's longformer core "
                             "takes one window for every layer")
        w = w[0]
    if w <= 0 or w % 2:
        raise ValueError(f"longformer config attention_window={w} must be a positive even number")
    return int(w)


def from_hf_longformer(config: dict, state_dict: dict) -> ZooModel:
    """LongformerForMaskedLM / ...ForSequenceClassification / LongformerModel -> ZooModel (core `longformer`).
    RoBERTa numbers positions from pad_token_id + 1: the zoo's table starts at that row."""
    c = config.to_dict() if hasattr(config, "to_dict") else config
    offset = c.get("pad_token_id", 1) + 1
    zoo_cfg = _encoder_cfg("longformer", c, name="longformer", activation=_activation("longformer", c, "hidden_act",
                                                                                        "gelu"),
                           attention={"core": "longformer", "window": _longformer_window(c), "backend": "auto"})
    zoo_cfg["max_seq_len"] -= offset
    zoo_cfg["type_vocab_size"] = c.get("type_vocab_size", 1)
    state = _canonical("longformer", state_dict)
    pos = "longformer.embeddings.position_embeddings.weight"
    if pos in state:
        state[pos] = state[pos][offset:]
    return _import("longformer", zoo_cfg, state)


def from_hf_big_bird(config: dict, state_dict: dict) -> ZooModel:
    """BigBirdForMaskedLM / ...ForSequenceClassification / BigBirdModel -> ZooModel (core `bigbird`, ITC: the
    first and last block global). The random blocks are the zoo's own seeded layout: HF draws them anew from
    numpy in training and uses none in eval, a layout no file records."""
    c = config.to_dict() if hasattr(config, "to_dict") else config
    _check_hf("big_bird", c, "rescale_embeddings", False, (False,))
    _check_hf("big_bird", c, "use_bias", True, (True,))
    kind = _check_hf("big_bird", c, "attention_type", "block_sparse", ("block_sparse", "original_full"))
    attention = {"core": "full", "backend": "auto"} if kind == "original_full" else {
        "core": "bigbird", "block_size": c.get("block_size", 64), "num_random_blocks": c.get("num_random_blocks", 3),
        "num_global_blocks": 1, "seed": 0, "backend": "auto"}
    zoo_cfg = _encoder_cfg("big_bird", c, name="bigbird",
                           activation=_activation("big_bird", c, "hidden_act", "gelu_new"), attention=attention)
    return _import("big_bird", zoo_cfg, state_dict)


def _check_exportable(cfg: ModelConfig, kind: str) -> None:
    """Every config field whose value HF's class cannot express, in one error."""
    gpt = kind == "gpt2"
    core = {"gpt2": "causal", "bert": "full", "longformer": "longformer", "big_bird": "bigbird"}[kind]
    need = {"arch": "decoder" if gpt else "encoder", "ffn": "mlp", "norm": "layernorm", "position": "learned",
            "bias": True, "shared_qk": False, "n_kv_heads": cfg.n_heads, "norm_position": "pre" if gpt else "post",
            "embed_norm": not gpt, "final_norm": gpt, "attention.core": core}
    if gpt:
        need["type_vocab_size"] = 0
    if cfg.num_labels:  # HF's sequence classifiers pool the first token
        need["pool"] = "cls"
    have = {f: cfg.attention["core"] if f == "attention.core" else getattr(cfg, f) for f in need}
    bad = [f"model.{f}={have[f]!r} (needs {v!r})" for f, v in need.items() if have[f] != v]
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        bad.append(f"model.head_dim={cfg.head_dim} (needs d_model / n_heads = {cfg.d_model / cfg.n_heads:g})")
    options = {"longformer": {"window", "impl"}, "big_bird": {"block_size", "num_random_blocks", "num_global_blocks",
                                                               "seed", "impl"}}.get(kind, set())
    extra = sorted(set(cfg.attention) - {"core", "backend"} - options)
    if extra:
        bad.append(f"model.attention options {extra} (needs none)")
    if kind == "big_bird" and cfg.attention.get("num_global_blocks", 1) != 1:
        bad.append(f"attention.num_global_blocks={cfg.attention['num_global_blocks']} (needs 1: HF's first and last block)")
    if bad:
        raise ValueError(f"model {cfg.name!r} has no Hugging Face {kind} counterpart: " + "; ".join(bad))


def _export(model: ZooModel, kind: str) -> dict:
    cfg = model.cfg
    mlm, cls = kind in _ENCODERS, cfg.num_labels > 0
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if kind in _ENCODERS and not cfg.type_vocab_size:
        ours["trunk.type_emb.weight"] = torch.zeros(1, cfg.d_model, dtype=ours["trunk.tok_emb.weight"].dtype)
    state = {}
    for zoo, hs, transpose in _table(cfg, kind, mlm, cls):
        for h, part in zip(hs, ours[zoo].chunk(len(hs), dim=0)):
            # own, contiguous storage: safetensors refuses views and shared tensors
            state[h] = (part.t() if transpose and part.dim() == 2 else part).contiguous().clone()
    return state


def to_hf_gpt2(model: ZooModel) -> tuple[dict, dict]:
    c = model.cfg
    _check_exportable(c, "gpt2")
    config = dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size, n_positions=c.max_seq_len,
        n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff,
        activation_function=_ACT_TO_HF[c.activation], layer_norm_epsilon=c.norm_eps, resid_pdrop=c.dropout,
        embd_pdrop=c.dropout, attn_pdrop=c.attn_dropout, initializer_range=c.init_std,
        tie_word_embeddings=c.tie_embeddings, scale_attn_weights=True, add_cross_attention=False,
        bos_token_id=None, eos_token_id=None,  # GPT-2's 50256 need not exist in our vocabulary
    )
    return config, _export(model, "gpt2")


def _encoder_config(c: ModelConfig, model_type: str, arch: str, **fields) -> dict:
    config = dict(
        model_type=model_type, architectures=[f"{arch}ForSequenceClassification" if c.num_labels else f"{arch}ForMaskedLM"],
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, intermediate_size=c.d_ff, hidden_act=_ACT_TO_HF[c.activation],
        hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.attn_dropout,
        max_position_embeddings=c.max_seq_len, type_vocab_size=c.type_vocab_size or 1,  # 1 zero row == none
        layer_norm_eps=c.norm_eps, initializer_range=c.init_std, position_embedding_type="absolute",
        tie_word_embeddings=c.tie_embeddings, is_decoder=False, add_cross_attention=False, **fields)
    if c.num_labels:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(c.num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(c.num_labels)}
    return config


def to_hf_bert(model: ZooModel) -> tuple[dict, dict]:
    _check_exportable(model.cfg, "bert")
    return _encoder_config(model.cfg, "bert", "Bert"), _export(model, "bert")


def to_hf_longformer(model: ZooModel) -> tuple[dict, dict]:
    c = model.cfg
    _check_exportable(c, "longformer")
    # RoBERTa's positions start at pad_token_id + 1 = 2: two unused rows ahead of ours
    config = _encoder_config(c, "longformer", "Longformer", attention_window=[c.attention["window"]] * c.n_layers,
                             pad_token_id=1, bos_token_id=0, eos_token_id=2, sep_token_id=2)
    config["max_position_embeddings"] = c.max_seq_len + 2
    state = _export(model, "longformer")
    pos = "longformer.embeddings.position_embeddings.weight"
    state[pos] = torch.cat([state[pos].new_zeros(2, c.d_model), state[pos]]).contiguous()
    return config, state


def to_hf_big_bird(model: ZooModel) -> tuple[dict, dict]:
    c = model.cfg
    _check_exportable(c, "big_bird")
    config = _encoder_config(c, "big_bird", "BigBird", attention_type="block_sparse",
                             block_size=c.attention.get("block_size", 64),
                             num_random_blocks=c.attention.get("num_random_blocks", 3), use_bias=True,
                             rescale_embeddings=False)
    return config, _export(model, "big_bird")


_FROM_HF = {"gpt2": from_hf_gpt2, "bert": from_hf_bert, "longformer": from_hf_longformer, "big_bird": from_hf_big_bird,
            "mixtral": from_hf_mixtral, "reformer": from_hf_reformer}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",  # in the order transformers prefers them
                 "pytorch_model.bin", "pytorch_model.bin.index.json")


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{path} holds objects that are not plain tensors; refusing to unpickle them "
                                  "(it could run code)") from None
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    except Exception as e:  # safetensors' SafetensorError and friends
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


def _read_weights(d: Path) -> dict:
    name = next((n for n in _WEIGHT_FILES if (d / n).is_file()), None)
    if name is None:
        found = sorted(p.name for p in d.iterdir())
        raise CheckpointError(f"{d} holds no weights: expected one of {', '.join(_WEIGHT_FILES)}; found {found}")
    if not name.endswith(".index.json"):
        return _read_file(d / name)
    try:
        weight_map = json.loads((d / name).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{d / name} is not a valid shard index ({type(e).__name__}: {e})") from None
    state = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:  # a shard outside the directory is not part of this checkpoint
            raise CheckpointError(f"{d / name} names shard {shard!r} outside {d}")
        state.update(_read_file(d / shard))
    absent = sorted(k for k in weight_map if k not in state)
    if absent:
        raise CheckpointError(f"shards of {d} lack {len(absent)} tensor(s) their index lists: {absent[:5]}")
    return state


def load_pretrained(path) -> tuple[ZooModel, ModelConfig]:
    """A Hugging Face directory (config.json + safetensors, sharded or not, or pytorch_model.bin) -> (model, cfg)."""
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"Hugging Face directory {d} does not exist")
    if not d.is_dir():
        raise CheckpointError(f"{d} is a file; load_pretrained takes a Hugging Face directory "
                              "(config.json + weights); for a zoo checkpoint use zoo.load_checkpoint")
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads((d / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / 'config.json'} is not valid JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in _FROM_HF:
        raise ValueError(f"config.json model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    model = _FROM_HF[model_type](config, _read_weights(d))
    return model, model.cfg


def _to_hf(model: ZooModel) -> tuple[dict, dict]:
    if model.cfg.ffn == "moe":
        return to_hf_mixtral(model)
    if model.cfg.reversible:
        return to_hf_reformer(model)
    if model.cfg.arch == "decoder":
        return to_hf_gpt2(model)
    core = model.cfg.attention["core"]
    return {"longformer": to_hf_longformer, "bigbird": to_hf_big_bird}.get(core, to_hf_bert)(model)


def save_pretrained(model: ZooModel, out_dir, overwrite: bool = False) -> Path:
    """Write config.json + model.safetensors that `transformers.AutoModelFor*.from_pretrained` loads.
    A decoder with MoE FFNs becomes Mixtral, another decoder GPT-2; an encoder with the longformer or bigbird
    core becomes Longformer or BigBird, another encoder BERT; a config its target cannot express raises before
    anything is written."""
    from safetensors.torch import save_file

    config, state = _to_hf(model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; refusing to overwrite it (pass overwrite=True)")
    out.mkdir(parents=True, exist_ok=True)
    # write beside, then rename: a failure half-way never leaves a truncated file in place of a good one
    for name, write in (("model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"})),
                        ("config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))):
        tmp = out / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, out / name)
    return out
