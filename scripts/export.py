"""Export a zoo checkpoint to Hugging Face format (GPT-2 for decoders, BERT for encoders).

    python scripts/export.py ckpt=outputs/.../last.ckpt out=exported/ [overwrite=true]

The directory then loads with `transformers.AutoModelForCausalLM.from_pretrained(out)` (or
AutoModelForMaskedLM / AutoModelForSequenceClassification). Models that GPT-2/BERT cannot express
(RoPE, GQA, SwiGLU, RMSNorm, sparse attention cores ...) fail before anything is written, with
the offending config fields named.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, without installing

import zoo  # noqa: E402

USAGE = "usage: python scripts/export.py ckpt=PATH out=DIR [overwrite=true]"
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_args(argv: list[str]) -> dict:
    args = {"overwrite": "false"}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in ("ckpt", "out", "overwrite"):
            raise ValueError(f"unknown argument {a!r}; valid: ckpt=PATH, out=DIR, overwrite=true|false")
        args[key] = value
    for key in ("ckpt", "out"):
        if not args.get(key):
            raise ValueError(f"missing {key}=...")
    if args["overwrite"].lower() not in _BOOLS:
        raise ValueError(f"overwrite={args['overwrite']!r}; valid choices: true, false")
    args["overwrite"] = _BOOLS[args["overwrite"].lower()]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"error: {e}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        model, cfg = zoo.load_checkpoint(args["ckpt"])
        out = zoo.save_pretrained(model, args["out"], overwrite=args["overwrite"])
    except (ValueError, OSError) as e:  # CheckpointError, no HF counterpart, refusing to overwrite
        print(f"error: {e}", file=sys.stderr)
        return 1
    kind = "GPT-2" if cfg.arch == "decoder" else "BERT"
    print(f"wrote {kind} model {cfg.name!r} ({model.num_params():,} parameters) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
