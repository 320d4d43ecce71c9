"""ModelConfig: every field a trunk understands, validated once, with errors that name the field."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from zoo.blocks.cores import check_core, split_options
from zoo.blocks.ffn import ACTIVATIONS, FFNS
from zoo.blocks.moe import DISPATCHES
from zoo.blocks.norms import NORMS
from zoo.blocks.positions import POSITIONS

ARCHS = ("decoder", "encoder")
RECURRENCES = ("none", "xl")  # xl: Transformer-XL segment recurrence (zoo.models.transformer_xl)
POOLS = ("cls", "mean")  # the classification head's input: the first token, or the mean over unpadded tokens


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
    ffn: str = "mlp"  # mlp, swiglu, or moe: n_experts SwiGLU experts of width d_ff behind a top-k router
    n_experts: int = 8
    moe_top_k: int = 2
    moe_aux_coef: float = 0.01  # Switch load-balancing loss weight (HF Mixtral: router_aux_loss_coef)
    moe_z_coef: float = 0.0  # ST-MoE router z-loss weight (0 = off; ST-MoE used 1e-3)
    moe_jitter: float = 0.0  # multiplicative router-input noise in training (Switch used 0.01)
    moe_capacity_factor: float | None = None  # None = dropless; else each expert takes ceil(cf * tokens * k / E)
    moe_dispatch: str = "auto"  # auto (grouped matmul where available), grouped, loop, reference
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
    pool: str = "cls"  # what the classification head reads: the first token (BERT), or the mean over tokens (LRA)
    init_std: float = 0.02
    activation_checkpointing: bool = False
    # one Block's weights applied n_layers times (ALBERT's cross-layer sharing; LRA's ListOps Transformer
    # "tied_weights"): parameters of one layer, compute of n_layers
    share_layers: bool = False
    # Reformer (zoo.models.reformer): a reversible two-stream stack whose output is 2 * d_model wide
    reversible: bool = False
    ffn_chunks: int = 1  # the FFN runs on this many slices of the sequence in turn (caps its activation)
    axial_shape: list | None = None  # [s0, s1]: axial position embeddings for s0 * s1 positions
    axial_dims: list | None = None  # [d0, d1], d0 + d1 = d_model
    # Transformer-XL (zoo.models.transformer_xl): a per-layer memory of earlier segments, relative positions
    recurrence: str = "none"  # none, or xl
    mem_len: int = 0  # memory positions per layer in training (0 = each segment alone)
    eval_mem_len: int | None = None  # memory in validation; None = mem_len (generation: at least max_seq_len)
    # RETRO (zoo.models.retro): chunked cross-attention to neighbours retrieved for each chunk of chunk_len tokens
    retrieval: bool = False
    chunk_len: int = 64  # must equal the retrieval database's chunk length (data.chunk_len)
    cca_layers: list | None = None  # decoder layers with chunked cross-attention; None = every other from layer 1
    retro_enc_layers: int = 2  # the neighbour encoder's depth (same width and heads as the decoder)

    @property
    def causal(self) -> bool:
        return self.arch == "decoder"

    @property
    def hidden_width(self) -> int:
        """Width of the trunk's output: a reversible stack hands both streams to the heads."""
        return 2 * self.d_model if self.reversible else self.d_model

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
        choice("pool", POOLS)
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
        if self.share_layers:
            # these keep per-layer state on the layer module (MoE routing statistics, XL memories, RETRO's
            # cross-attention layers, the reversible stack's two streams): one module cannot serve every layer
            for fld, bad in (("ffn", self.ffn == "moe"), ("recurrence", self.recurrence != "none"),
                             ("retrieval", self.retrieval), ("reversible", self.reversible)):
                if bad:
                    raise ValueError(f"model.share_layers=true does not combine with model.{fld}="
                                     f"{getattr(self, fld)!r}")
        if core.needs_shared_qk and not self.shared_qk:
            raise ValueError(f"attention.core={core.name!r} needs model.shared_qk=true")
        if self.ffn == "moe":
            self._validate_moe()
        self._validate_reformer()
        self._validate_recurrence()
        self._validate_retrieval()
        for p in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, p) < 1.0:
                raise ValueError(f"model.{p} must be in [0, 1), got {getattr(self, p)}")
        return self

    def _validate_moe(self) -> None:
        if self.n_experts < 1:
            raise ValueError(f"model.n_experts must be >= 1, got {self.n_experts}")
        if not 1 <= self.moe_top_k <= self.n_experts:
            raise ValueError(f"model.moe_top_k={self.moe_top_k} must be in [1, model.n_experts={self.n_experts}]")
        for p in ("moe_aux_coef", "moe_z_coef"):
            if getattr(self, p) < 0:
                raise ValueError(f"model.{p} must be >= 0, got {getattr(self, p)}")
        if not 0.0 <= self.moe_jitter < 1.0:
            raise ValueError(f"model.moe_jitter must be in [0, 1), got {self.moe_jitter}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ValueError(f"model.moe_capacity_factor must be > 0, or null for dropless routing, "
                             f"got {self.moe_capacity_factor}")
        if self.moe_dispatch not in DISPATCHES:
            raise ValueError(f"model.moe_dispatch={self.moe_dispatch!r}; valid choices: {', '.join(DISPATCHES)}")

    def _validate_reformer(self) -> None:
        if not isinstance(self.ffn_chunks, int) or self.ffn_chunks < 1:
            raise ValueError(f"model.ffn_chunks must be an integer >= 1, got {self.ffn_chunks!r}")
        if self.reversible:
            if self.norm_position != "pre":
                raise ValueError("model.reversible=true needs model.norm_position=pre (each sub-layer normalises "
                                 "its input; a post-norm residual cannot be inverted)")
            if self.ffn == "moe":
                raise ValueError("model.reversible=true does not take model.ffn=moe: the router's auxiliary loss is "
                                 "computed in a forward pass without autograd and would get no gradient; "
                                 "valid choices: mlp, swiglu")
            if self.tie_embeddings:
                raise ValueError("model.reversible=true needs model.tie_embeddings=false: the LM head reads both "
                                 f"streams (2 * d_model = {2 * self.d_model} wide), not the embedding width")
        if (self.axial_shape is None) != (self.axial_dims is None):
            raise ValueError("model.axial_shape and model.axial_dims go together: set both, or neither")
        if self.axial_shape is not None:
            self.axial_shape, self.axial_dims = list(self.axial_shape), list(self.axial_dims)
            if len(self.axial_shape) != 2 or len(self.axial_dims) != 2 or min(self.axial_shape + self.axial_dims) < 1:
                raise ValueError(f"model.axial_shape={self.axial_shape} and model.axial_dims={self.axial_dims} "
                                 "must each be two positive integers")
            if sum(self.axial_dims) != self.d_model:
                raise ValueError(f"model.axial_dims={self.axial_dims} must sum to model.d_model={self.d_model}")
            if self.axial_shape[0] * self.axial_shape[1] < self.max_seq_len:
                raise ValueError(f"model.axial_shape={self.axial_shape} covers {self.axial_shape[0] * self.axial_shape[1]}"
                                 f" positions, fewer than model.max_seq_len={self.max_seq_len}")
            if self.position != "learned":
                raise ValueError(f"model.axial_shape replaces the learned position table; it needs "
                                 f"model.position=learned, got {self.position!r}")

    def _validate_recurrence(self) -> None:
        if self.recurrence not in RECURRENCES:
            raise ValueError(f"model.recurrence={self.recurrence!r}; valid choices: {', '.join(RECURRENCES)}")
        if self.eval_mem_len is None:
            self.eval_mem_len = self.mem_len
        for fld in ("mem_len", "eval_mem_len"):
            if not isinstance(getattr(self, fld), int) or getattr(self, fld) < 0:
                raise ValueError(f"model.{fld} must be an integer >= 0, got {getattr(self, fld)!r}")
        if self.recurrence != "xl":
            return
        # the XL trunk has its own attention: these fields pick parts of the generic one it does not use
        needs = {"arch": "decoder", "position": "none", "reversible": False, "shared_qk": False}
        for fld, want in needs.items():
            if getattr(self, fld) != want:
                raise ValueError(f"model.recurrence=xl needs model.{fld}={want!r} (relative positions live in "
                                 f"its attention), got {getattr(self, fld)!r}")
        if self.n_kv_heads != self.n_heads:
            raise ValueError(f"model.recurrence=xl needs model.n_kv_heads == model.n_heads={self.n_heads}, "
                             f"got {self.n_kv_heads}")
        if self.attention["core"] != "causal":
            raise ValueError(f"model.recurrence=xl computes its own relative attention over [memory; segment]; "
                             f"attention.core={self.attention['core']!r}, valid choices: causal")
        if self.d_model % 2:
            raise ValueError(f"model.recurrence=xl needs an even model.d_model (sinusoid pairs), got {self.d_model}")

    def _validate_retrieval(self) -> None:
        if not isinstance(self.chunk_len, int) or self.chunk_len < 1:
            raise ValueError(f"model.chunk_len must be a positive integer, got {self.chunk_len!r}")
        if not isinstance(self.retro_enc_layers, int) or self.retro_enc_layers < 1:
            raise ValueError(f"model.retro_enc_layers must be an integer >= 1, got {self.retro_enc_layers!r}")
        if self.cca_layers is None:
            self.cca_layers = list(range(1, self.n_layers, 2)) or [0]
        self.cca_layers = sorted(set(self.cca_layers))
        bad = [i for i in self.cca_layers if not isinstance(i, int) or not 0 <= i < self.n_layers]
        if bad or (self.retrieval and not self.cca_layers):
            raise ValueError(f"model.cca_layers={self.cca_layers} must be a non-empty list of layer indices in "
                             f"[0, model.n_layers={self.n_layers})")
        if not self.retrieval:
            return
        needs = {"arch": "decoder", "recurrence": "none", "reversible": False, "norm_position": "pre"}
        for fld, want in needs.items():
            if getattr(self, fld) != want:
                raise ValueError(f"model.retrieval=true needs model.{fld}={want!r}, got {getattr(self, fld)!r}")
        if self.head_dim % 2:
            raise ValueError(f"model.retrieval=true: the neighbour encoder uses rotary positions, which need an even "
                             f"head_dim, got {self.head_dim}")
