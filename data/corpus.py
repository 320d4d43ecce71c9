"""Real text with no download: the default corpus is the CPython standard library's source.

Every machine with Python has it (about 12.6 MB of .py outside test/), so `make train` needs no hub.
A document is one file; the train/val split is by a hash of the file's path, so it is stable when
another Python version adds or removes files. `source=` may also name a local file or folder
(every text file in it), or a Hugging Face dataset (`hf:wikitext:wikitext-2-raw-v1`) for users who
can reach a hub.
"""
from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

CORPUS_SOURCES = ("stdlib", "<path to a file or folder>", "hf:<dataset>[:<config>]")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ".xml", ".json", ".csv", ".tex", ".html", ""}


@dataclass
class Document:
    name: str  # path relative to the corpus root; the first component doubles as a class label
    text: str


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _folder_documents(root: Path, suffixes) -> list[Document]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune while walking: the stdlib folder holds site-packages, which can be gigabytes
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        paths += [Path(dirpath, f) for f in filenames if Path(f).suffix in suffixes]
    docs = []
    for p in sorted(paths):
        try:
            docs.append(Document(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # a binary or unreadable file is not text
    return docs


def _hub_documents(spec: str, split: str) -> list[Document]:
    import datasets  # only users with a hub (or its cache) come here

    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split)
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return [Document(f"{split}/{i}", t) for i, t in enumerate(ds[column]) if t]


@functools.lru_cache(maxsize=4)
def load_corpus(source: str = "stdlib") -> list[Document]:
    """All documents of a source, sorted by name (a deterministic order on every machine)."""
    if source == "stdlib":
        return _folder_documents(_stdlib_root(), {".py"})
    if source.startswith("hf:"):
        return _hub_documents(source[3:], "train")
    path = Path(source).expanduser()
    if path.is_file():
        return [Document(path.name, path.read_text(encoding="utf-8", errors="replace"))]
    if path.is_dir():
        docs = _folder_documents(path, _TEXT_SUFFIXES)
        if not docs:
            raise ValueError(f"data.source={source!r} is a folder with no readable text files")
        return docs
    raise ValueError(f"data.source={source!r} is neither 'stdlib', an existing file or folder, nor 'hf:<dataset>'; "
                     f"valid forms: {', '.join(CORPUS_SOURCES)}")


def is_validation(doc: Document, val_percent: float) -> bool:
    return zlib.crc32(doc.name.encode()) % 10_000 < val_percent * 100


def split_corpus(docs: list[Document], val_percent: float) -> tuple[list[Document], list[Document]]:
    if len(docs) == 1:
        # one long document (a single file): the last val_percent of it is validation
        text = docs[0].text
        cut = int(len(text) * (1 - val_percent / 100))
        return [Document(docs[0].name, text[:cut])], [Document(docs[0].name, text[cut:])]
    val = [d for d in docs if is_validation(d, val_percent)]
    train = [d for d in docs if not is_validation(d, val_percent)]
    if not val or not train:
        # too few documents for the hash to hit both sides: the last ones (by name) are validation
        n_val = max(1, round(len(docs) * val_percent / 100))
        train, val = docs[:-n_val], docs[-n_val:]
    return train, val
