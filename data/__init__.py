"""Corpora, tokenizers and LightningDataModules. Imports nothing of `zoo` or `kernels`."""
from data.corpus import CORPUS_SOURCES, load_corpus
from data.modules import CausalLMDataModule, ClassificationDataModule, MLMDataModule
from data.tokenizers import TOKENIZERS, build_tokenizer

__all__ = [
    "CORPUS_SOURCES", "CausalLMDataModule", "ClassificationDataModule", "MLMDataModule", "TOKENIZERS",
    "build_tokenizer", "load_corpus",
]
