"""ModelConfig: every field a trunk understands, validated once, with errors that name the field."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from zoo.blocks.cores import check_core, split_options
from zoo.blocks.ffn import ACTIVATIONS, FFNS
from zoo.blocks.norms import NORMS
from zoo.blocks.positions import POSITIONS

ARCHS = ("decoder", "encoder")


@dataclass
class ModelConfig:
    name: str = "custom"
    arch: str = "decoder"  # decoder: causal LM; encoder: bidirectional, MLM + classification heads
    vocab_size: int = 320  # the byte tokenizer's 256 bytes + specials, padded up to a multiple of 64
    max_seq_len: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = MQA; in between = GQA
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int | None = None  # None = 4 * d_model
    ffn: str = "mlp"
    activation: str = "gelu_tanh"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    embed_norm: bool = False  # BERT normalises the summed embeddings
    final_norm: bool = True  # pre-norm stacks end with a norm; post-norm ones do not need it
    position: str = "learned"
    rope_base: float = 10000.0
    type_vocab_size: int = 0  # BERT's segment embeddings; 0 = none
    bias: bool = True
    shared_qk: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    attention: dict = field(default_factory=lambda: {"core": "causal", "backend": "auto"})
    num_labels: int = 0  # > 0 adds a sequence-classification head
    init_std: float = 0.02
    activation_checkpointing: bool = False

    @property
    def causal(self) -> bool:
        return self.arch == "decoder"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"_target_"})
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; valid fields: {', '.join(sorted(names))}")
        # null means "the default" (vocab_size: null in a YAML = the byte tokenizer's until the data fills it in)
        return cls(**{k: v for k, v in d.items() if k in names and v is not None}).validated()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validated(self) -> "ModelConfig":
        def choice(fld, choices):
            if getattr(self, fld) not in choices:
                raise ValueError(f"model.{fld}={getattr(self, fld)!r}; valid choices: {', '.join(choices)}")

        choice("arch", ARCHS)
        choice("ffn", FFNS)
        choice("activation", ACTIVATIONS)
        choice("norm", NORMS)
        choice("norm_position", ("pre", "post"))
        choice("position", POSITIONS)
        for fld in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, fld) <= 0:
                raise ValueError(f"model.{fld} must be positive, got {getattr(self, fld)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.shared_qk and self.n_kv_heads != self.n_heads:
            raise ValueError("model.shared_qk=true needs model.n_kv_heads == model.n_heads (keys are the queries)")
        if not isinstance(self.attention, dict) or "core" not in self.attention:
            raise ValueError("model.attention must be a mapping with a 'core' key, e.g. {core: causal}")
        self.attention = dict(self.attention)
        core = check_core(self.attention["core"], self.causal, model_name=f"model {self.name!r}")
        options, dropped = split_options(core.name, {k: v for k, v in self.attention.items() if k != "core"})
        if dropped:
            warnings.warn(f"attention.core={core.name!r} ignores the option(s) {dropped} (set for another core)")
        self.attention = {"core": core.name, **options}
        if core.needs_shared_qk and not self.shared_qk:
            raise ValueError(f"attention.core={core.name!r} needs model.shared_qk=true")
        for p in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, p) < 1.0:
                raise ValueError(f"model.{p} must be in [0, 1), got {getattr(self, p)}")
        return self
