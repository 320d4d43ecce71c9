"""Attention Zoo: transformer models assembled from shared blocks.

    import zoo
    model = zoo.build_model("gpt", vocab_size=320)          # plain nn.Module
    logits = model(input_ids)                              # (batch, seq, vocab)
    model, cfg = zoo.load_checkpoint("outputs/.../last.ckpt")
    model, cfg = zoo.load_pretrained("path/to/hf_gpt2_dir")
"""
from zoo.checkpoint import CheckpointError, load_checkpoint
from zoo.models import ModelConfig, ZooModel, build_model, model_config
from zoo.hf import load_pretrained, save_pretrained

__all__ = [
    "CheckpointError", "ModelConfig", "ZooModel", "build_model", "load_checkpoint", "load_pretrained", "model_config",
    "save_pretrained",
]
