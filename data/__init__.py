"""Corpora, tokenizers and LightningDataModules. Imports nothing of `zoo` or `kernels`."""
from data.corpus import CORPUS_SOURCES, load_corpus
from data.modules import CausalLMDataModule, ClassificationDataModule, MLMDataModule
from data.tokenizers import TOKENIZERS, build_tokenizer, tokenizer_from_state, tokenizer_state

__all__ = [
    "CORPUS_SOURCES", "CausalLMDataModule", "ClassificationDataModule", "MLMDataModule", "TOKENIZERS",
    "build_tokenizer", "load_corpus", "tokenizer_from_state", "tokenizer_state",
]
