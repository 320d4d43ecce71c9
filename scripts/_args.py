"""key=value command-line arguments for the scripts (the same syntax as Hydra overrides, no Hydra)."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse(argv: list[str], defaults: dict, required: tuple[str, ...] = ()) -> dict:
    """Values are parsed as YAML scalars (`max_new_tokens=20` is an int); unknown keys are errors."""
    args = dict(defaults)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"argument {item!r} is not key=value; valid keys: {', '.join(defaults)}")
        if key not in defaults:
            raise SystemExit(f"unknown argument {key!r}; valid keys: {', '.join(defaults)}")
        args[key] = yaml.safe_load(value) if value else ""
        if isinstance(defaults[key], str) and not isinstance(args[key], str):
            args[key] = value  # a prompt like `prompt=123` stays text
    missing = [k for k in required if args.get(k) in (None, "")]
    if missing:
        raise SystemExit(f"missing required argument(s): {', '.join(f'{k}=...' for k in missing)}")
    return args
