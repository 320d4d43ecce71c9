"""Lightning strategies that need Python objects a YAML file cannot name (FSDP's wrap policy)."""
from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy

from zoo.blocks.block import Block

SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False,
                  state_dict_type: str = "full", **kwargs) -> FSDPStrategy:
    """FSDP that shards each transformer Block as one unit (and, optionally, recomputes its activations).
    state_dict_type=full gathers a single-file checkpoint on rank zero, which `zoo.load_checkpoint` reads
    in a single process like any other; `sharded` writes one shard per rank (faster for large models)."""
    if sharding_strategy not in SHARDING:
        raise ValueError(f"trainer.strategy.sharding_strategy={sharding_strategy!r}; valid choices: {', '.join(SHARDING)}")
    if state_dict_type not in ("full", "sharded"):
        raise ValueError(f"trainer.strategy.state_dict_type={state_dict_type!r}; valid choices: full, sharded")
    return FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block} if activation_checkpointing
                        else None, sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs)
