"""What LRA ListOps and Pathfinder give away without long-range reasoning: accuracy of rules that read one cue.

    python scripts/lra_baselines.py                         # our generators at LRA's settings (one to two minutes)
    python scripts/lra_baselines.py train=6000 val=2000 seed=3

ListOps: the majority class, and a rule that reads only the outermost operator (MIN -> its commonest value in
the training expressions, and so on); a model that learns that rule needs attention from <cls> to position 1
only. Pathfinder: the best single threshold on the distance between the two markers (both classes mark the two
ends of one contour, so it should be near chance). Rules are fitted on `train` examples and scored on `val`
others.

`cnn=N` (off by default) also asks whether our Pathfinder labels can be learned from the images at all, and
from local evidence alone: two small CNNs trained on N generated images (Adam, one-cycle, `cnn_epochs`) and
scored on `pathfinder` others. One sees the whole image (three poolings, a receptive field past 32 pixels); the
other only 7 x 7 pixels (three 3x3 convolutions, then a max over positions), enough to see a marker or a gap
but not whether the gap is on the marked contour. What the first reaches says the labels can be
learned; what the second reaches above chance is a cue in the images that needs no contour following, and a
sequence model could use it as well:

    python scripts/lra_baselines.py cnn=20000        # about 15 minutes on 2 CPU cores (docs/lra.md has the figures)
"""
from __future__ import annotations

import collections
import json
import sys

import numpy as np
import torch
from torch import nn

from _args import parse
from data.lra import PATHFINDER_DEFAULTS, generate_listops, generate_pathfinder, pathfinder_example


def listops(n_train: int, n_val: int, seed: int) -> dict:
    train, y_train = generate_listops(n_train, seed=seed)
    val, y_val = generate_listops(n_val, seed=seed + 1, seen={" ".join(e) for e in train})
    y_val = np.asarray(y_val)
    majority = collections.Counter(y_train).most_common(1)[0][0]
    by_op = collections.defaultdict(collections.Counter)
    for expr, y in zip(train, y_train):
        by_op[expr[0]][y] += 1
    rule = {op: counts.most_common(1)[0][0] for op, counts in by_op.items()}
    pred = np.asarray([rule.get(expr[0], majority) for expr in val])
    return {"majority_class": float((y_val == majority).mean()), "outermost_operator": float((pred == y_val).mean()),
            "rule": rule}


def _marker_distances(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dist, label = [], []
    for i in range(n):
        ex = None
        while ex is None:
            ex = pathfinder_example(rng, i % 2 == 0, **PATHFINDER_DEFAULTS)
        a, b = ex[1]
        dist.append(float(np.hypot(a[0] - b[0], a[1] - b[1])))
        label.append(i % 2 == 0)
    return np.asarray(dist), np.asarray(label)


def pathfinder(n_train: int, n_val: int, seed: int) -> dict:
    """The threshold (and direction) best on the training images, scored on the validation ones."""
    d_train, y_train = _marker_distances(n_train, seed)
    d_val, y_val = _marker_distances(n_val, seed + 1)
    rules = [(t, below) for t in np.arange(0, 45, 0.25) for below in (True, False)]
    fit = lambda d, y, t, below: float((((d < t) if below else (d >= t)) == y).mean())  # noqa: E731
    t, below = max(rules, key=lambda r: fit(d_train, y_train, *r))
    return {"marker_distance_threshold": fit(d_val, y_val, t, below), "threshold": float(t),
            "connected_if": "closer" if below else "farther",
            "mean_distance": {"connected": float(d_val[y_val].mean()), "disconnected": float(d_val[~y_val].mean())}}


def _conv(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


def cnn_models() -> dict[str, nn.Module]:
    head = lambda c: [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c, 2)]  # noqa: E731
    pool = nn.MaxPool2d(2)
    return {"whole_image": nn.Sequential(_conv(1, 32), _conv(32, 32), pool, _conv(32, 64), _conv(64, 64), pool,
                                         _conv(64, 128), _conv(128, 128), pool, _conv(128, 128), *head(128)),
            "local_7px": nn.Sequential(_conv(1, 32), _conv(32, 64), _conv(64, 64), nn.Conv2d(64, 64, 1), nn.ReLU(),
                                       *head(64))}


def cnn(n_train: int, n_test: int, seed: int, epochs: int, batch: int = 128) -> dict:
    """Test accuracy of each CNN of cnn_models() trained on n_train generated Pathfinder images."""
    images = lambda n, s: [torch.as_tensor(a) for a in generate_pathfinder(n, seed=s, workers=2)]  # noqa: E731
    (x, y), (xt, yt) = images(n_train, seed), images(n_test, seed + 1)
    res = PATHFINDER_DEFAULTS["resolution"]
    as_img = lambda a: a.float().view(-1, 1, res, res) / 255.0  # noqa: E731
    x, xt = as_img(x), as_img(xt)
    out = {}
    for name, model in cnn_models().items():
        torch.manual_seed(seed)
        steps = epochs * (n_train // batch)
        opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n_train)
            for i in range(0, n_train - batch + 1, batch):
                idx = order[i:i + batch]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xt[i:i + 500]).argmax(1) for i in range(0, n_test, 500)])
        out[name] = float((pred == yt).float().mean())
    return out


def main(argv: list[str]) -> dict:
    o = parse(argv, {"train": 6000, "val": 2000, "seed": 11, "pathfinder": 4000, "cnn": 0, "cnn_epochs": 4})
    out = {"listops": listops(o["train"], o["val"], o["seed"]),
           "pathfinder": pathfinder(o["pathfinder"], o["pathfinder"], o["seed"])}
    if o["cnn"]:
        out["pathfinder_cnn"] = cnn(o["cnn"], o["pathfinder"], o["seed"], o["cnn_epochs"])
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
