"""What LRA ListOps and Pathfinder give away without long-range reasoning: accuracy of rules that read one cue.

    python scripts/lra_baselines.py                         # our generators at LRA's settings (about a minute)
    python scripts/lra_baselines.py train=6000 val=2000 seed=3

ListOps: the majority class, and a rule that reads only the outermost operator (MIN -> its commonest value in
the training expressions, and so on); a model that learns that rule needs attention from <cls> to position 1
only. Pathfinder: the best single threshold on the distance between the two markers, with the generator's
distance match on (the default) and off. Rules are fitted on `train` examples and scored on `val` others.
"""
from __future__ import annotations

import collections
import json
import sys

import numpy as np

from _args import parse
from data.lra import PATHFINDER_DEFAULTS, generate_listops, pathfinder_example


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


def _marker_distances(n: int, seed: int, tolerance) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dist, label = [], []
    for i in range(n):
        ex = None
        while ex is None:
            ex = pathfinder_example(rng, i % 2 == 0, **{**PATHFINDER_DEFAULTS, "distance_tolerance": tolerance})
        a, b = ex[1]
        dist.append(float(np.hypot(a[0] - b[0], a[1] - b[1])))
        label.append(i % 2 == 0)
    return np.asarray(dist), np.asarray(label)


def pathfinder(n_train: int, n_val: int, seed: int, tolerance) -> dict:
    """The threshold (and direction) best on the training images, scored on the validation ones."""
    d_train, y_train = _marker_distances(n_train, seed, tolerance)
    d_val, y_val = _marker_distances(n_val, seed + 1, tolerance)
    rules = [(t, below) for t in np.arange(0, 45, 0.25) for below in (True, False)]
    fit = lambda d, y, t, below: float((((d < t) if below else (d >= t)) == y).mean())  # noqa: E731
    t, below = max(rules, key=lambda r: fit(d_train, y_train, *r))
    return {"marker_distance_threshold": fit(d_val, y_val, t, below), "threshold": float(t),
            "connected_if": "closer" if below else "farther",
            "mean_distance": {"connected": float(d_val[y_val].mean()), "disconnected": float(d_val[~y_val].mean())}}


def main(argv: list[str]) -> dict:
    o = parse(argv, {"train": 6000, "val": 2000, "seed": 11, "pathfinder": 4000})
    out = {"listops": listops(o["train"], o["val"], o["seed"]),
           "pathfinder": {str(tol): pathfinder(o["pathfinder"], o["pathfinder"], o["seed"], tol)
                          for tol in (PATHFINDER_DEFAULTS["distance_tolerance"], None)}}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
