"""The attention math: plain references and fast implementations, each fast one tested against its reference.

Layout everywhere: q is (batch, heads, seq, head_dim); k and v are (batch, kv_heads, seq, head_dim)
with heads a multiple of kv_heads (GQA/MQA). Nothing here knows about modules or configs.
"""
from kernels.softmax_attention import (
    BACKENDS,
    attention,
    attention_flash,
    attention_reference,
    attention_sdpa,
    flash_attn_available,
)

__all__ = ["BACKENDS", "attention", "attention_flash", "attention_reference", "attention_sdpa", "flash_attn_available"]
