"""Tokenizers: bytes (default, nothing to train) and byte-level BPE trained on the corpus and cached."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

TOKENIZERS = ("byte", "bpe")
SPECIALS = ("<pad>", "<eos>", "<mask>", "<cls>", "<sep>")


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Embedding tables padded up to a multiple of 64: tensor cores like it, the unused rows cost nothing."""
    return (n + multiple - 1) // multiple * multiple


class ByteTokenizer:
    """UTF-8 bytes 0..255, then the specials. Bits per byte is exact: one token is one byte."""

    name = "byte"

    def __init__(self):
        self.n_tokens = 256 + len(SPECIALS)
        for i, s in enumerate(SPECIALS):
            setattr(self, s.strip("<>") + "_id", 256 + i)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def special_ids(self) -> list[int]:
        return list(range(256, self.n_tokens))


class IdTokenizer:
    """Synthetic tasks' tokens (MQAR, duplication): ids 0..n-1, written as space-separated integers. Their models
    keep the task's vocabulary: padded up to the byte tokenizer's ids, an MQAR model at vocabulary 64 got an
    output layer 5x too wide, and exact attention sat at 0.37 recall after 1,500 steps instead of reaching
    1.0 by step 500 (CPU, d_model 64, 8 pairs)."""

    name = "ids"

    def __init__(self, n_tokens: int):
        self.n_tokens = n_tokens
        self.eos_id = 0  # the tasks' filler token: what a sample starts from

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(w) for w in text.split()]
        except ValueError:
            raise ValueError(f"this model reads token ids: a prompt is space-separated integers in "
                             f"[0, {self.n_tokens}), got {text!r}") from None
        bad = [i for i in ids if not 0 <= i < self.n_tokens]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside [0, {self.n_tokens}) in the prompt {text!r}")
        return ids

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def special_ids(self) -> list[int]:
        return []


class BPETokenizer:
    """Byte-level BPE (GPT-2's scheme) trained with `tokenizers` on the training split, cached as JSON."""

    name = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.n_tokens = tok.get_vocab_size()
        for s in SPECIALS:
            setattr(self, s.strip("<>") + "_id", tok.token_to_id(s))

    @classmethod
    def train_or_load(cls, texts, vocab_size: int, cache_dir: Path, key: str) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        digest = hashlib.sha1(f"{key}-{vocab_size}".encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"bpe-{vocab_size}-{digest}.json"
        if path.exists():
            return cls(Tokenizer.from_file(str(path)))
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # this process's own: ranks may train it side by side
        tok.save(str(tmp))
        tmp.replace(path)  # atomic: a killed run never leaves half a tokenizer behind
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def special_ids(self) -> list[int]:
        return [self.tok.token_to_id(s) for s in SPECIALS]


def build_tokenizer(kind: str, texts=None, vocab_size: int = 4096, cache_dir: Path | str = ".cache", key: str = ""):
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if texts is None:
            raise ValueError("tokenizer=bpe needs the training texts (or a cached tokenizer)")
        return BPETokenizer.train_or_load(texts, vocab_size, Path(cache_dir), key)
    raise ValueError(f"data.tokenizer={kind!r}; valid choices: {', '.join(TOKENIZERS)}")


def tokenizer_state(tok) -> dict:
    """What a checkpoint stores to rebuild its tokenizer with no corpus and no cache."""
    if isinstance(tok, ByteTokenizer):
        return {"kind": "byte"}
    if isinstance(tok, IdTokenizer):
        return {"kind": "ids", "n_tokens": tok.n_tokens}
    return {"kind": "bpe", "json": tok.tok.to_str()}


def tokenizer_from_state(state: dict):
    if state.get("kind") == "byte":
        return ByteTokenizer()
    if state.get("kind") == "bpe":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_str(state["json"]))
    if state.get("kind") == "ids":
        return IdTokenizer(int(state["n_tokens"]))
    raise ValueError(f"tokenizer state kind={state.get('kind')!r}; valid choices: {', '.join(TOKENIZERS)}, ids")
