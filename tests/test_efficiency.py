"""scripts/efficiency.py (LRA Table 2's analogue) and compare.py's two new modes, the results page and the MQAR
pivot: tiny CPU runs, seconds each."""
import csv
import json
import re
from pathlib import Path

import pytest

from helpers import ROOT
from scripts import compare, efficiency, results_page

TINY = ["device=cpu", "dtype=fp32", "d_model=16", "n_layers=1", "n_heads=2", "d_ff=32", "batch=2", "repeats=1",
        "warmup=1"]


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_efficiency_writes_tables_relative_to_full(tmp_path):
    out = tmp_path / "eff" / "tiny"
    rows, backends = efficiency.main([*TINY, "cores=lsh,full", "seq_lens=64,32", f"out={out}"])
    # full first at each length (the baseline), lengths ascending; lsh built with the shared QK it needs
    assert [(r["core"], r["seq_len"]) for r in rows] == [("full", 32), ("lsh", 32), ("full", 64), ("lsh", 64)]
    for n in (32, 64):
        timed = [b for b in backends if b["seq_len"] == n]
        assert {b["impl"] for b in timed} == {"sdpa flash", "sdpa math"}  # every CPU SDPA backend was timed
        full = next(r for r in rows if r["core"] == "full" and r["seq_len"] == n)
        assert full["ms/step"] == min(b["ms/step"] for b in timed)  # ... and the fastest is the baseline
    got = _csv(f"{out}.csv")
    assert len(got) == 4
    for r in got:
        assert float(r["ms/step"]) > 0 and float(r["peak MiB"]) > 0 and float(r["speed x"]) > 0
        if r["core"] == "full":
            assert float(r["speed x"]) == 1.0 and float(r["memory x"]) == 1.0
        else:
            assert float(r["speed x"]) == pytest.approx(float(r["steps/s"]) / float(
                next(f for f in got if f["core"] == "full" and f["seq_len"] == r["seq_len"])["steps/s"]))
    md = Path(f"{out}.md").read_text()
    assert "python scripts/efficiency.py" in md and "## Training steps per second" in md and "## Peak memory" in md
    assert re.search(r"^\| full \(fastest SDPA backend\) \| [\d.]+ \(1\.00x\) \| [\d.]+ \(1\.00x\) \|$", md, re.M)
    assert Path(f"{out}.png").stat().st_size > 1000


def test_efficiency_builds_each_core_through_the_zoo_config():
    o = efficiency.options(["device=cpu", "size=lra"])
    assert o["sizes"] == {"d_model": 512, "n_layers": 6, "n_heads": 8, "d_ff": 2048, "batch": 32, "dropout": 0.1}
    cfgs = {c: efficiency.model_config(c, 1024, o) for c in efficiency.DEFAULT_CORES}
    assert all(c.attention["core"] == name for name, c in cfgs.items())
    assert all(c.arch == "encoder" for c in cfgs.values())  # sparse_strided: its mirrored pattern
    assert efficiency.model_config("causal", 1024, o).arch == "decoder"  # a causal-only core: the model made causal
    assert cfgs["lsh"].shared_qk and not cfgs["full"].shared_qk
    assert cfgs["longformer"].attention["global_projections"] == "shared"  # experiment=lra_listops's option
    assert cfgs["full"].attention["backend"] == "sdpa"
    o = efficiency.options(["device=cpu", "attention=recompute:true,chunk_size:32"])  # to every core that takes them
    perf, full = efficiency.model_config("performer", 256, o), efficiency.model_config("full", 256, o)
    assert perf.attention["recompute"] is True and perf.attention["chunk_size"] == 32
    assert "recompute" not in full.attention


def test_efficiency_oom_is_a_cell_and_longer_lengths_are_skipped(tmp_path, monkeypatch):
    calls = []
    real = efficiency.time_step

    def fake(cfg, n, o, backend):
        calls.append((cfg.attention["core"], n))
        if cfg.attention["core"] == "linear" and n >= 32:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes.")
        return real(cfg, n, o, backend)

    monkeypatch.setattr(efficiency, "time_step", fake)
    rows, _ = efficiency.main([*TINY, "cores=full,linear", "seq_lens=16,32,48", "sdpa_backends=flash",
                               f"out={tmp_path / 'oom'}"])
    linear = [r for r in rows if r["core"] == "linear"]
    assert [r["ms/step"] for r in linear][1:] == ["OOM", "OOM"] and linear[0]["ms/step"] > 0
    assert ("linear", 48) not in calls  # not tried again once out of memory
    assert "| linear | " in (tmp_path / "oom.md").read_text() and "OOM" in (tmp_path / "oom.md").read_text()


def test_the_baseline_is_full_attention_even_when_another_row_is_faster(tmp_path, monkeypatch):
    # causal attention also runs through SDPA and is faster than full: it must not become the baseline
    fake_ms = {("full", "flash"): 4.0, ("full", "math"): 8.0, ("causal", None): 2.0}
    monkeypatch.setattr(efficiency, "time_step", lambda cfg, n, o, b: (fake_ms[(cfg.attention["core"], b)], 10.0))
    rows, backends = efficiency.main([*TINY, "cores=full,causal", "seq_lens=16", f"out={tmp_path / 'b'}"])
    assert [(r["core"], r["impl"], r["speed x"]) for r in rows] == [("full", "sdpa flash", 1.0),
                                                                    ("causal", "sdpa (auto)", 2.0)]
    assert [b["impl"] for b in backends] == ["sdpa flash", "sdpa math"]


@pytest.mark.parametrize("args, words", [
    (["cores=full,nosuch"], ["nosuch", "valid choices", "sliding_window", "lsh"]),
    (["cores=linear"], ["must include full"]),
    (["sdpa_backends=cudnnx"], ["sdpa_backends=cudnnx", "valid choices", "flash"]),
    (["size=huge"], ["size='huge'", "lra, small"]),
    (["nosuch=1"], ["unknown argument", "seq_lens"]),
    (["d_model=0"], ["must be >= 1"]),
    (["batch=x"], ["take integers", "batch='x'"]),
    (["attention=recompute"], ["attention='recompute'", "key:value"]),
])
def test_efficiency_bad_input_names_the_choices(tmp_path, args, words):
    with pytest.raises(SystemExit) as err:
        efficiency.main([*TINY, *args, f"out={tmp_path / 'x'}"])
    for w in words:
        assert w in str(err.value)
    assert not list(tmp_path.iterdir())  # checked before anything is timed or written


def _mqar_run(root: Path, name: str, model: str, core: str, acc: float, overrides=(), config=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"model": model, "attention": core, "overrides": list(overrides),
                                                "val/acc": acc, "global_step": 10}))
    if config:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text(config)


def test_mqar_pivot_core_by_pairs_per_width(tmp_path):
    a, b = tmp_path / "mqar", tmp_path / "mqar_moe"
    for i, (core, pairs, acc) in enumerate([("linear", 8, 0.5), ("causal", 8, 0.9), ("causal", 32, 0.8),
                                            ("linear", 32, 0.25)]):
        _mqar_run(a, f"{i}_x", "mqar", core, acc,
                  [f"attention={core}", "model.d_model=64", f"data.num_kv_pairs={pairs}"])
    _mqar_run(a, "4_x", "mqar", "causal", 0.7, ["model.d_model=128", "data.num_kv_pairs=8"])
    # a run without the sizes in its overrides: read from its resolved config
    _mqar_run(b, "0_x", "mqar_moe", "causal", 0.85, [], config="model:\n  d_model: 64\ndata:\n  num_kv_pairs: 8\n")
    rows = compare.main(["mqar", str(a), str(b), f"out={tmp_path / 'pivot'}"])
    assert len(rows) == 6
    md = (tmp_path / "pivot.md").read_text()
    assert "d_model = 64\n\n| core | 8 pairs | 32 pairs |" in md
    # rows in the zoo's order, sibling experiments by core and arm, a missing cell as a dash
    assert "| causal | 0.900 | 0.800 |\n| linear | 0.500 | 0.250 |\n| causal (moe) | 0.850 | – |" in md
    assert "d_model = 128\n\n| core | 8 pairs |\n|---|---|\n| causal | 0.700 |" in md
    assert len(_csv(tmp_path / "pivot.csv")) == 6 and (tmp_path / "pivot.png").stat().st_size > 1000


def test_mqar_pivot_errors_name_the_run(tmp_path):
    _mqar_run(tmp_path / "s", "0_x", "mqar", "causal", 0.5, ["model.d_model=64"])  # pairs nowhere
    with pytest.raises(ValueError, match=r"0_x: cannot tell its data.num_kv_pairs"):
        compare.main(["mqar", str(tmp_path / "s")])
    (tmp_path / "t" / "0_y").mkdir(parents=True)
    (tmp_path / "t" / "0_y" / "metrics.json").write_text(json.dumps({"model": "gpt", "val/loss": 1.0}))
    with pytest.raises(ValueError, match="has no val/acc: not an MQAR run"):
        compare.main(["mqar", str(tmp_path / "t")])
    with pytest.raises(ValueError, match="usage: compare.py mqar DIR"):
        compare.main(["mqar"])


def test_results_page_has_every_comparison_and_its_links_resolve(tmp_path, capsys):
    out = tmp_path / "docs" / "results.md"
    text = compare.main(["results", f"out={out}"])
    assert out.read_text() == text
    for title in ("Efficiency", "MQAR", "Long documents", "MoE vs dense", "Reformer", "Transformer-XL", "LRA ListOps",
                  "Speed and memory benchmarks"):
        assert f"## {title}" in text, title
    for section in text.split("\n## ")[1:-1]:  # every comparison: a command, ours, the paper, a verdict
        assert "```bash\npython " in section and "**Ours.**" in section and "**Paper.**" in section
        assert "**Agrees / differs.**" in section
    # every linked file exists (relative to docs/, where the page lives) and nothing is reported missing
    linked = re.findall(r"\]\(([^)#]+)\)", text)
    assert linked and all((ROOT / "docs" / p).exists() for p in linked), [p for p in linked
                                                                         if not (ROOT / "docs" / p).exists()]
    assert "(missing" not in text and "missing result files" not in capsys.readouterr().err
    # figures are copied from the result files, not typed in: the efficiency table is the committed one's
    eff = (ROOT / "docs" / "results" / "efficiency_h200.md").read_text()
    table = next(t for t in results_page.tables(ROOT / "docs" / "results" / "efficiency_h200.md"))
    assert table in eff and table in text


def test_results_mode_rejects_stray_arguments():
    with pytest.raises(ValueError, match="usage: compare.py results"):
        compare.main(["results", "docs"])


def test_efficiency_keep_extends_an_earlier_table(tmp_path):
    first, second = tmp_path / "short", tmp_path / "long"
    efficiency.main([*TINY, "cores=full,linear", "seq_lens=32", f"out={first}"])
    rows, _ = efficiency.main([*TINY, "cores=full,linear", "seq_lens=64", f"keep={first}.csv", f"out={second}"])
    assert [(r["core"], r["seq_len"]) for r in rows] == [("full", 32), ("linear", 32), ("full", 64), ("linear", 64)]
    kept = {(r["core"], int(r["seq_len"])): float(r["ms/step"]) for r in _csv(f"{first}.csv")}
    assert rows[1]["ms/step"] == kept[("linear", 32)] and rows[1]["speed x"] == pytest.approx(
        kept[("full", 32)] / kept[("linear", 32)])
    md = Path(f"{second}.md").read_text()
    assert f"kept from the earlier run in `{first}.csv`" in md and "| model | 32 | 64 |" in md
    with pytest.raises(SystemExit, match="batch"):
        efficiency.main([*TINY[:-3], "batch=3", "repeats=1", "warmup=1", "cores=full", "seq_lens=64",
                         f"keep={first}.csv", f"out={second}"])
