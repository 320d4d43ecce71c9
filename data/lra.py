"""Long Range Arena (Tay et al. 2021) ListOps and Pathfinder-32, generated locally by our own code.

ListOps (Nangia & Bowman 2018, with LRA's settings): a random expression tree, tokenized as LRA does,

    [MAX 2 9 [MIN 4 7 ] 0 ]          ->  label 9

operators MIN, MAX, MED (median, truncated to an integer as LRA's ``int(np.median(...))``) and SM (sum mod 10),
values 0-9. The tree follows LRA's generator: a node below `max_depth` is an operator with probability
`value_p` = 0.25 (else a digit), an operator has 2..`max_args` arguments, the root is at depth 1. Trees are
drawn until one has between `min_len` and `max_len` tokens; an expression seen before is drawn again, so the
examples of all splits are distinct (no test expression is in train). The label is given by `evaluate_listops`,
a reference evaluator independent of the generator.

Pathfinder-32 (Linsley et al. 2018, LRA's 32x32 set): two dashed contours, each a smooth random walk
(heading turned by Normal(0, `curvature`) radians each unit step, `contour_len` steps, dashes of `dash` lit
steps then `gap` dark ones), and `num_distractors` short dash segments. Two endpoint markers (3x3 blocks) sit
on the two ends of contour A in both classes, and a gap (`cut` points removed from the middle) is cut into one
contour: into B (label 1, connected) or into A (label 0). The classes differ only in where the gap is, so the
markers' distance and how the marked ends look locally say nothing about the label. (Version 2 marked one end of
each contour in a disconnected image, the pair chosen to match A's end-to-end distance: a CNN that sees 7 x 7
pixels then told the classes apart 60% of the time, from how the chosen ends looked; now 49%,
scripts/lra_baselines.py cnn=20000.) Both contours are drawn alike, each in the empty image, so neither's shape
says which is A or which is cut; both contours' gaps, drawn or not, keep `cut_margin` pixels from the markers.
Contours (and a contour's two halves around its gap), markers and distractors keep `clearance` pixels
(Chebyshev) from one another, so the objects never touch: with `gap=0` the connected examples are exactly those
whose markers are joined under an 8-connected flood fill of the lit pixels. Intensities: lit pixels 255
(markers) or drawn in [160, 255] per dash, background 0. Labels alternate 1, 0, 1, 0, ... before a seeded
shuffle: exactly balanced. Not pixel-identical to the original generator (no paddle sprites, no anti-aliasing).

Both are seeded: a split is a function of its generation parameters and the seed only (Pathfinder's images are
drawn in independently seeded shards, in parallel, with the same result for any number of processes). Splits
are cached with `datasets` (`save_to_disk`) under `cache_dir`, keyed by all generation parameters; a second run
loads them.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.loading import ResumableDataModule
from data.tokenizers import ByteTokenizer, pad_vocab

TASKS = ("listops", "pathfinder")
SPLITS = ("train", "val", "test")

# -- ListOps ---------------------------------------------------------------------------------------------------
MIN, MAX, MED, SM, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SM)
LISTOPS_VOCAB = ("<pad>", "<cls>", END, *OPERATORS, *(str(d) for d in range(10)))
LISTOPS_IDS = {t: i for i, t in enumerate(LISTOPS_VOCAB)}
PAD_ID, CLS_ID = 0, 1


def _apply(op: str, args: list[int]) -> int:
    if not args:
        raise ValueError(f"operator {op} without arguments")
    if op == MIN:
        return min(args)
    if op == MAX:
        return max(args)
    if op == MED:
        return int(np.median(args))  # as LRA: the mean of the middle two, truncated
    if op == SM:
        return sum(args) % 10
    raise ValueError(f"unknown operator {op!r}")


def evaluate_listops(tokens) -> int:
    """The value of a tokenized ListOps expression (a string of space-separated tokens, or a list of them)."""
    if isinstance(tokens, str):
        tokens = tokens.split()
    stack: list[tuple[str, list[int]]] = []
    result = None
    for t in tokens:
        if t in OPERATORS:
            stack.append((t, []))
        elif t == END:
            if not stack:
                raise ValueError("unbalanced ']'")
            op, args = stack.pop()
            value = _apply(op, args)
            if stack:
                stack[-1][1].append(value)
            elif result is None:
                result = value
            else:
                raise ValueError("more than one expression")
        elif t.isdigit() and len(t) == 1:
            if stack:
                stack[-1][1].append(int(t))
            elif result is None:
                result = int(t)
            else:
                raise ValueError("more than one expression")
        else:
            raise ValueError(f"unknown token {t!r}")
    if stack or result is None:
        raise ValueError("incomplete expression")
    return result


class _TooLong(Exception):
    pass


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, value_p: float, out: list, budget: int):
    r = rng.random() if depth < max_depth else 1.0
    if r > value_p:
        out.append(str(rng.randrange(10)))
    else:
        n_args = rng.randint(2, max_args)
        op = rng.choice(OPERATORS)
        out.append(op)
        for _ in range(n_args):
            _tree(rng, depth + 1, max_depth, max_args, value_p, out, budget)
        out.append(END)
    if len(out) > budget:
        raise _TooLong  # the tree would be rejected anyway: stop growing it


def generate_listops(n: int, *, min_len: int = 500, max_len: int = 2000, max_depth: int = 10, max_args: int = 10,
                     value_p: float = 0.25, seed: int = 0, seen: set | None = None, max_tries: int = 10_000_000):
    """n distinct expressions as (token lists, labels); `seen` (shared across splits) holds expressions drawn."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    seen = set() if seen is None else seen
    exprs, labels = [], []
    tries = 0
    while len(exprs) < n:
        tries += 1
        if tries > max_tries:
            raise RuntimeError(f"ListOps: only {len(exprs)} of {n} distinct expressions of {min_len}-{max_len} "
                               f"tokens after {max_tries} draws")
        out: list[str] = []
        try:
            _tree(rng, 1, max_depth, max_args, value_p, out, max_len)
        except _TooLong:
            continue
        if len(out) < min_len:
            continue
        key = " ".join(out)
        if key in seen:
            continue
        seen.add(key)
        exprs.append(out)
        labels.append(evaluate_listops(out))
    return exprs, labels


# -- Pathfinder ------------------------------------------------------------------------------------------------
PATHFINDER_DEFAULTS = dict(resolution=32, contour_len=30, curvature=0.35, dash=3, gap=1, num_distractors=4,
                           distractor_len=4, clearance=2, cut=4, cut_margin=8)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
            xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
            out[yd, xd] |= mask[ys, xs]
    return out


def _walk(rng: np.random.Generator, steps: int, curvature: float, res: int, blocked: np.ndarray, margin: int):
    """Pixels of a smooth random walk of `steps` unit steps avoiding `blocked`, or None."""
    for _ in range(20):
        y, x = rng.uniform(margin, res - 1 - margin, size=2)
        theta = rng.uniform(0, 2 * math.pi)
        pts = [(int(round(y)), int(round(x)))]
        ok = not blocked[pts[0]]
        while ok and len(pts) <= steps:
            for _attempt in range(8):
                th = theta + rng.normal(0, curvature)
                ny, nx = y + math.sin(th), x + math.cos(th)
                p = (int(round(ny)), int(round(nx)))
                if margin <= p[0] < res - margin and margin <= p[1] < res - margin and not blocked[p]:
                    y, x, theta = ny, nx, th
                    if p != pts[-1]:
                        pts.append(p)
                    break
            else:
                ok = False
        if ok:
            return pts[: steps + 1]
    return None


def _draw_dashed(img: np.ndarray, pts, dash: int, gap: int, rng: np.random.Generator, skip=range(0)) -> None:
    period = dash + gap
    for k, p in enumerate(pts):
        if k % period == 0:
            level = int(rng.integers(160, 256))
        if k % period < dash and k not in skip:
            img[p] = level


def _marker_mask(res: int, p) -> np.ndarray:
    m = np.zeros((res, res), dtype=bool)
    m[max(p[0] - 1, 0): p[0] + 2, max(p[1] - 1, 0): p[1] + 2] = True
    return m


def _cut(n: int, cut: int) -> range:
    """The `cut` points removed from the middle of a contour of n points."""
    m = (n - cut) // 2
    return range(m, m + cut)


def pathfinder_example(rng: np.random.Generator, connected: bool, *, resolution: int = 32, contour_len: int = 30,
                       curvature: float = 0.35, dash: int = 3, gap: int = 1, num_distractors: int = 4,
                       distractor_len: int = 4, clearance: int = 2, cut: int = 4, cut_margin: int = 8):
    """One (res, res) uint8 image with its two marker centres (A's ends), or None when the layout did not fit:
    the contours, or a contour's halves around its gap, too close, or a gap within `cut_margin` of a marker
    (the module docstring says why)."""
    res = resolution
    img = np.zeros((res, res), dtype=np.uint8)
    empty = np.zeros((res, res), dtype=bool)
    contours, objects, gap_ends = [], [], []
    for _ in range(2):
        pts = _walk(rng, contour_len, curvature, res, empty, margin=1)
        if pts is None or len(pts) < cut + 4:
            return None
        gone = _cut(len(pts), cut)
        halves = [np.zeros((res, res), dtype=bool) for _ in range(2)]
        for k, p in enumerate(pts):
            if k not in gone:
                halves[k > gone.start][p] = True
        if (_dilate(halves[0], clearance) & halves[1]).any():
            return None  # the cut would not separate it
        obj = halves[0] | halves[1] | _marker_mask(res, pts[0]) | _marker_mask(res, pts[-1])
        for k in gone:
            obj[pts[k]] = True  # the gap stays clear of other objects
        contours.append(pts)
        objects.append(obj)
        gap_ends += [pts[gone.start - 1], pts[gone.stop]]
    if (_dilate(objects[0], clearance) & objects[1]).any():
        return None
    a, b = contours
    # both gaps, whichever is drawn (the layout does not depend on the label): one this close to a marker would
    # be visible without following the contour
    if min(max(abs(p[0] - m[0]), abs(p[1] - m[1])) for p in gap_ends for m in (a[0], a[-1])) < cut_margin:
        return None
    occupied = objects[0] | objects[1]
    for _ in range(num_distractors):
        pts = _walk(rng, distractor_len, curvature, res, _dilate(occupied, clearance), margin=0)
        if pts is None:
            continue  # a crowded image gets fewer distractors
        obj = np.zeros((res, res), dtype=bool)
        for p in pts:
            obj[p] = True
        occupied |= obj
        _draw_dashed(img, pts, dash, gap, rng)
    for pts, is_cut in ((a, not connected), (b, connected)):
        _draw_dashed(img, pts, dash, gap, rng, skip=_cut(len(pts), cut) if is_cut else range(0))
    ends = (a[0], a[-1])
    for p in ends:
        img[_marker_mask(res, p)] = 255
    return img, ends


PATHFINDER_SHARD = 4000  # images per independently seeded shard: the images do not depend on the worker count


def _pathfinder_shard(seed: int, shard: int, start: int, count: int, params: dict) -> np.ndarray:
    """Images start .. start + count - 1 of a split (connected where the index is even), from shard's own seed."""
    rng = np.random.default_rng([seed, shard])
    images = np.zeros((count, params["resolution"] ** 2), dtype=np.uint8)
    for j in range(count):
        for _ in range(1000):
            ex = pathfinder_example(rng, (start + j) % 2 == 0, **params)
            if ex is not None:
                break
        else:
            raise RuntimeError(f"Pathfinder: no layout fits with {params}")
        images[j] = ex[0].reshape(-1)
    return images


def generate_pathfinder(n: int, *, seed: int = 0, workers: int = 1, **params):
    """n images flattened to (n, res*res) uint8, and labels (n,) int64 (exactly balanced up to one). Drawn in
    shards of PATHFINDER_SHARD images, each from its own seed, by `workers` processes (the result is the same
    for any number of them), then shuffled with `seed`."""
    return generate_pathfinder_splits([(n, seed)], workers=workers, **params)[0]


def generate_pathfinder_splits(splits, *, workers: int = 1, **params) -> list:
    """generate_pathfinder(n, seed=seed) for each (n, seed) of `splits`, with every split's shards in one pool of
    workers: a small split does not leave most of them idle while it finishes (the same images)."""
    params = {**PATHFINDER_DEFAULTS, **params}
    shards = [(seed, i, start, min(PATHFINDER_SHARD, n - start), params)
              for n, seed in splits for i, start in enumerate(range(0, n, PATHFINDER_SHARD))]
    if workers > 1 and len(shards) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(shards)), mp_context=multiprocessing.get_context("fork")) as ex:
            parts = list(ex.map(_pathfinder_shard, *zip(*shards)))
    else:
        parts = [_pathfinder_shard(*a) for a in shards]
    out = []
    for n, seed in splits:
        count = -(-n // PATHFINDER_SHARD)
        mine, parts = parts[:count], parts[count:]
        images = np.concatenate(mine) if mine else np.zeros((0, params["resolution"] ** 2), np.uint8)
        labels = (np.arange(n) % 2 == 0).astype(np.int64)
        order = np.random.default_rng(seed).permutation(n)
        out.append((images[order], labels[order]))
    return out


# -- data module -----------------------------------------------------------------------------------------------
class _LRASet(Dataset):
    """Examples as token arrays (no CLS); served with <cls> first, padded to seq_len."""

    def __init__(self, seqs, labels, seq_len: int, offset: int):
        self.seqs, self.labels, self.seq_len, self.offset = seqs, labels, seq_len, offset

    def __len__(self):
        return len(self.labels)

    def truncate(self, n: int) -> None:
        self.seqs, self.labels = self.seqs[:n], self.labels[:n]

    def __getitem__(self, key):
        epoch, i, b = key
        body = torch.as_tensor(np.asarray(self.seqs[i], dtype=np.int64)) + self.offset
        ids = torch.full((self.seq_len,), PAD_ID, dtype=torch.long)
        ids[0] = CLS_ID
        ids[1 : 1 + len(body)] = body
        mask = torch.zeros(self.seq_len, dtype=torch.long)
        mask[: 1 + len(body)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": int(self.labels[i]), "batch_number": b}


class LRADataModule(ResumableDataModule):
    """LRA ListOps or Pathfinder-32 for sequence classification: <cls> first (the head pools position 0).

    ListOps ids: 0 <pad>, 1 <cls>, then ']', the operators and the digits (16 tokens). Pathfinder ids:
    0 <pad>, 1 <cls>, 2 + intensity (0-255). `seq_len` must hold <cls> + the longest example
    (ListOps: max_len + 1; Pathfinder: resolution**2 + 1); shorter examples are padded (attention_mask 0).
    """

    def __init__(self, task: str = "listops", seq_len: int = 2001, num_train: int = 96_000, num_val: int = 2_000,
                 num_test: int = 2_000, min_len: int = 500, max_len: int = 2000, max_depth: int = 10,
                 max_args: int = 10, pathfinder: dict | None = None, batch_size: int = 32, seed: int = 1234,
                 num_workers: int = 0, cache_dir: str = ".cache/zoo", max_val_batches: int | None = None,
                 num_classes: int | None = None, num_proc: int | None = None):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"data.task={task!r}; valid choices: {', '.join(TASKS)}")
        if batch_size < 1 or num_train < 1 or num_val < 1 or num_test < 0:
            raise ValueError("data.batch_size, data.num_train and data.num_val must be positive")
        self.task, self.seq_len = task, seq_len
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.listops = dict(min_len=min_len, max_len=max_len, max_depth=max_depth, max_args=max_args)
        self.pathfinder = {**PATHFINDER_DEFAULTS, **(dict(pathfinder) if pathfinder else {})}
        unknown = set(self.pathfinder) - set(PATHFINDER_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown data.pathfinder keys: {sorted(unknown)}")
        if task == "listops" and seq_len < max_len + 1:
            # a model shorter than LRA's expressions (debug=smoke: 64 positions): expressions that fit it
            fit = dict(max_len=seq_len - 1, min_len=max(1, min(min_len, (seq_len - 1) // 2)))
            print(f"[zoo] LRA ListOps: data.seq_len={seq_len} < max_len + 1 = {max_len + 1}: generating expressions "
                  f"of {fit['min_len']}-{fit['max_len']} tokens instead of {min_len}-{max_len}", file=sys.stderr)
            self.listops.update(fit)
        need = self.listops["max_len"] + 1 if task == "listops" else self.pathfinder["resolution"] ** 2 + 1
        if seq_len < need:
            raise ValueError(f"data.seq_len={seq_len} is too short for {task}: <cls> + the longest example need "
                             f"{need} (set model.max_seq_len, which data.seq_len follows)")
        if num_proc is not None and (not isinstance(num_proc, int) or num_proc < 1):
            raise ValueError(f"data.num_proc must be a positive integer or null (all CPU cores), got {num_proc!r}")
        self.num_proc = num_proc or min(os.cpu_count() or 1, 32)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.cache_dir, self.max_val_batches = Path(cache_dir), max_val_batches
        self.num_classes = 10 if task == "listops" else 2
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(f"data.num_classes={num_classes}, but LRA {task} has {self.num_classes} classes")

    @property
    def num_labels(self) -> int:
        return self.num_classes

    @property
    def vocab_size(self) -> int:
        n = len(LISTOPS_VOCAB) if self.task == "listops" else 2 + 256
        # at least the byte tokenizer's ids, as MQAR: scripts feed text to a checkpoint's tokenizer
        return pad_vocab(max(n, ByteTokenizer().n_tokens))

    def load_tokenizer(self):
        return ByteTokenizer()  # checkpoints store a tokenizer; LRA ids are not text

    # -- generation and cache -----------------------------------------------------------------------------------
    def generation_params(self) -> dict:
        # version (Pathfinder): 2 since its images are drawn in seeded shards (1 was one stream per split), 3 since
        # a disconnected image is a cut through the marked contour
        p = {"task": self.task, "seed": self.seed, "sizes": self.sizes, "version": 1 if self.task == "listops" else 3}
        p.update(self.listops if self.task == "listops" else self.pathfinder)
        return p

    def cache_path(self) -> Path:
        key = hashlib.sha1(json.dumps(self.generation_params(), sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"lra-{self.task}-{key}"

    def generate(self) -> dict:
        """{split: (sequences of raw ids, labels)}: ListOps token ids without the offset of <pad>/<cls>
        (0 = ']'), Pathfinder intensities 0-255."""
        out = {}
        if self.task == "listops":
            seen: set = set()  # shared: no expression appears in two splits
            for s, split in enumerate(SPLITS):
                exprs, labels = generate_listops(self.sizes[split], seed=self.seed * 10 + s, seen=seen, **self.listops)
                out[split] = ([[LISTOPS_IDS[t] - 2 for t in e] for e in exprs], labels)
        else:
            splits = [(self.sizes[split], self.seed * 10 + s) for s, split in enumerate(SPLITS)]
            out = dict(zip(SPLITS, generate_pathfinder_splits(splits, workers=self.num_proc, **self.pathfinder)))
        return out

    def prepare_data(self):
        path = self.cache_path()
        if (path / "done").exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # one generator per cache entry: the jobs of a sweep started together wait for the first one's data
        # instead of each generating it (the first sweep on a 2-GPU machine: 6 processes, 4 minutes)
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "done").exists():
                self._write(path)

    def _write(self, path: Path) -> None:
        from datasets import Dataset as HFDataset

        splits = self.generate()
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for split, (seqs, labels) in splits.items():
            HFDataset.from_dict({"input_ids": seqs, "label": labels}).save_to_disk(str(tmp / split))
        (tmp / "params.json").write_text(json.dumps(self.generation_params(), sort_keys=True, indent=1))
        (tmp / "done").write_text("")
        try:
            tmp.rename(path)
        except OSError:  # another machine sharing the cache finished first
            shutil.rmtree(tmp, ignore_errors=True)

    def load_split(self, split: str):
        from datasets import load_from_disk

        ds = load_from_disk(str(self.cache_path() / split))
        labels = np.asarray(ds["label"], dtype=np.int64)
        if self.task == "pathfinder":
            seqs = np.asarray(ds.with_format("numpy")["input_ids"], dtype=np.int64)
        else:
            # views into the Arrow buffer instead of ds["input_ids"]'s 100M+ Python ints: LRA's 96K expressions
            # load in 2.1 s instead of 5.3 s (2-core CPU), in every run of a sweep
            col = ds.data.column("input_ids").combine_chunks()
            offsets = col.offsets.to_numpy()
            flat = np.array(col.values.to_numpy(), dtype=np.int64)  # writable (torch warns on read-only)
            seqs = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        return seqs, labels

    def setup(self, stage=None):
        self.prepare_data()  # a no-op when the cache is there (prepare_data ran, or an earlier run)
        offset = 2  # past <pad>, <cls>
        self.train_set = _LRASet(*self.load_split("train"), self.seq_len, offset)
        self.val_set = _LRASet(*self.load_split("val"), self.seq_len, offset)
        if self.sizes["test"]:
            self.test_set = _LRASet(*self.load_split("test"), self.seq_len, offset)
        if self.max_val_batches:
            rank_world = (self.trainer.world_size if self.trainer is not None else 1)
            self.val_set.truncate(self.max_val_batches * self.batch_size * rank_world)

    # -- loaders (the shared plumbing is data.loading.ResumableDataModule) ----------------------------------------
    def test_dataloader(self):
        if not self.sizes["test"]:
            raise ValueError("the test split is empty (data.num_test=0): set data.num_test > 0 to score it")
        return self._loader(self.test_set, shuffle=False)[0]
