"""scripts/bench.py and scripts/compare.py, called as functions on tiny inputs (CPU, seconds each)."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("bench")
compare = _load("compare")

TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2"]


def test_bench_writes_md_csv_png(tmp_path, capsys):
    out = tmp_path / "bench" / "tiny"
    rows = bench.main(["model=gpt", *TINY, "seq_lens=32,16", "batch=2", "repeats=1", "warmup=1",
                       "device=cpu", f"out={out}"])
    assert [(r["config"], r["seq_len"]) for r in rows] == [("gpt " + " ".join(TINY), 16), ("gpt " + " ".join(TINY), 32)]
    for r in rows:
        assert r["ms/step"] > 0 and r["tokens/s"] > 0
        # at least the weights, and the step's activations grow with length
        assert r["peak MiB"] * 2**20 >= r["params"] * 4
    assert rows[1]["peak MiB"] > rows[0]["peak MiB"]
    md = (tmp_path / "bench" / "tiny.md").read_text()
    assert "seq_len" in md and "ms/step" in md and "peak MiB" in md and "tokens/s" in md
    assert "python scripts/bench.py model=gpt" in md and "Machine:" in md
    table = [line for line in md.splitlines() if line.startswith("| gpt")]
    assert len(table) == 2
    with open(tmp_path / "bench" / "tiny.csv") as f:
        got = list(csv.DictReader(f))
    assert [int(r["seq_len"]) for r in got] == [16, 32]
    assert (tmp_path / "bench" / "tiny.png").stat().st_size > 1000
    assert table[0] in capsys.readouterr().out


def test_bench_several_configs_and_learned_positions_raised(tmp_path):
    # the default position table is 256 long: a longer benchmark length must not fail
    rows = bench.main([f"configs=gpt {' '.join(TINY)}; gpt attention=causal {' '.join(TINY)} model.n_kv_heads=1",
                       "seq_lens=300", "batch=1", "repeats=1", "warmup=0", f"out={tmp_path / 'two'}"])
    assert [r["config"] for r in rows] == ["gpt " + " ".join(TINY),
                                           "gpt attention=causal " + " ".join(TINY) + " model.n_kv_heads=1"]
    assert rows[1]["params"] < rows[0]["params"]  # one shared K/V head


def test_bench_records_oom_and_goes_on(tmp_path, monkeypatch):
    real = bench.bench_one

    def fake(cfg, n, opts):
        if n > 16:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes.")
        return real(cfg, n, opts)

    monkeypatch.setattr(bench, "bench_one", fake)
    rows = bench.main(["model=gpt", *TINY, "seq_lens=16,32", "repeats=1", "warmup=0", f"out={tmp_path / 'oom'}"])
    assert rows[0]["ms/step"] > 0 and rows[1]["ms/step"] == "OOM" and rows[1]["peak MiB"] == "OOM"
    assert "| OOM |" in (tmp_path / "oom.md").read_text()


@pytest.mark.parametrize("args, words", [
    (["model=nosuch"], ["model='nosuch'", "valid choices", "bert", "gpt"]),
    (["model=gpt", "attention=nosuch"], ["attention='nosuch'", "valid choices", "causal", "full"]),
    (["model=gpt", "model.nosuch=1"], ["nosuch", "valid fields"]),
    (["dtype=fp8"], ["dtype", "fp32, bf16"]),
    (["nosuch=1"], ["unknown argument", "seq_lens"]),
])
def test_bench_bad_input_names_the_choices(tmp_path, args, words):
    with pytest.raises(ValueError) as err:
        bench.main([*args, "seq_lens=16", f"out={tmp_path / 'x'}"])
    for w in words:
        assert w in str(err.value)
    assert not list(tmp_path.iterdir())  # checked before anything is written


def _write_run(root: Path, name: str, **metrics):
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(metrics))


def test_compare_table(tmp_path, capsys):
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    _write_run(sweep, "0_model=gpt", model="gpt", attention="causal", overrides=["model=gpt"],
               **{"val/loss": 2.5, "val/ppl": 12.18, "train/tokens_per_s": 1000.0}, params=100, global_step=20)
    _write_run(sweep, "10_model=bert", model="bert", attention="full", overrides=["model=bert", "data.seq_len=64"],
               **{"val/loss": 3.0, "val/acc": 0.41}, params=200, global_step=20)
    _write_run(sweep, "2_model=gpt,model.n_kv_heads=1", model="gpt", attention="causal",
               overrides=["model=gpt", "model.n_kv_heads=1"], **{"val/loss": 2.25}, params=90, global_step=20)
    (sweep / "3_crashed").mkdir()  # no metrics.json: skipped
    runs = compare.main([str(sweep), f"out={tmp_path / 'cmp'}"])
    assert [r["run"] for r in runs] == ["0_model=gpt", "2_model=gpt,model.n_kv_heads=1", "10_model=bert"]
    md = (tmp_path / "cmp.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run"))
    assert header == ("| run | model | attention | overrides | params | global_step | val/acc | val/loss | val/ppl"
                      " | train/tokens_per_s |")
    assert "| 10_model=bert | bert | full | model=bert data.seq_len=64 | 200 | 20 | 0.41 | 3 |  |  |" in md
    assert "| 0_model=gpt | gpt | causal | model=gpt | 100 | 20 |  | 2.5 | 12.18 | 1000 |" in md
    with open(tmp_path / "cmp.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 3 and got[2]["val/acc"] == "0.41" and got[0]["val/acc"] == ""
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert header in capsys.readouterr().out


def test_compare_default_out_is_inside_the_directory(tmp_path):
    _write_run(tmp_path, "0_a", model="gpt", attention="causal", overrides=[], **{"val/loss": 1.0})
    compare.main([str(tmp_path)])
    assert (tmp_path / "compare.md").exists() and (tmp_path / "compare.csv").exists()


def test_compare_without_runs_errors_clearly(tmp_path):
    (tmp_path / "0_crashed").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.json below"):
        compare.main([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        compare.main([str(tmp_path / "nosuch")])
    assert not (tmp_path / "compare.md").exists()


def test_compare_xl_memory_table_gain_and_plot(tmp_path, capsys):
    rows = [{"ckpt": "a", "model": "transformer_xl", "params": 3506000, "segment": 128, "bpb_mem0x": 2.66,
             "bpb_mem1x": 2.59, "bpb_mem2x": 2.5, "bpb_mem4x": 2.6},
            {"ckpt": "b", "model": "gpt_ctx", "params": 3504000, "segment": 128, "bpb_mem0x": 3.1}]
    (tmp_path / "xl.json").write_text(json.dumps(rows))
    compare.main(["xl_memory", str(tmp_path / "xl.json"), f"out={tmp_path / 'rep'}"])
    md = (tmp_path / "rep.md").read_text()
    assert "| transformer_xl | 3.51M | 128 | 2.6600 | 2.5900 | 2.5000 | 2.6000 |" in md
    assert "| gpt_ctx | 3.50M | 128 | 3.1000 | - | - | - |" in md
    assert "0x->1x: +0.0700, 1x->2x: +0.0900, 2x->4x: -0.1000" in md and "Dai et al. 2019" in md
    assert (tmp_path / "rep.png").stat().st_size > 0 and (tmp_path / "rep.csv").exists()
    with pytest.raises(FileNotFoundError, match="no such file"):
        compare.main(["xl_memory", str(tmp_path / "nosuch.json")])
    with pytest.raises(ValueError, match="usage: compare.py xl_memory"):
        compare.main(["xl_memory", "bogus=1"])


def test_compare_corrupt_file_is_named(tmp_path):
    (tmp_path / "0_a").mkdir()
    (tmp_path / "0_a" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="0_a/metrics.json is not valid JSON"):
        compare.main([str(tmp_path)])


def test_bench_cores_times_every_core_against_sdpa(tmp_path):
    cores = _load("bench_cores")
    out = tmp_path / "cores"
    rows = cores.main(["seq_lens=64,96", "heads=2", "head_dim=8", "repeats=1", "warmup=0", "device=cpu",
                       "cores=sliding_window,longformer,bigbird,sparse_strided,performer,linear", f"out={out}"])
    labels = {r["impl"] for r in rows}
    assert {"sliding_window", "longformer", "bigbird", "sparse_strided", "performer", "linear"} <= labels
    assert any(label.startswith("sdpa causal") for label in labels)
    assert all(r["ms fwd+bwd"] > 0 and r["peak MiB"] > 0 for r in rows)
    assert (out.with_suffix(".md")).read_text().count("\n| ") == len(rows) + 1
    assert out.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit, match="valid choices"):
        cores.main(["cores=nope", f"out={out}"])
    with pytest.raises(SystemExit, match="profile='yes'; valid choices: true, false"):
        cores.main(["profile=yes", f"out={out}"])


def test_bench_cores_profile_writes_each_rows_top_operators(tmp_path):
    cores = _load("bench_cores")
    out = tmp_path / "cores"
    rows = cores.main(["seq_lens=64", "heads=2", "head_dim=8", "repeats=1", "warmup=0", "device=cpu",
                       "cores=performer", "profile=true", f"out={out}"])
    text = (tmp_path / "cores_profiles.txt").read_text()
    assert text.count("## ") == len(rows) and "performer @ 64" in text and "Self CPU" in text


def test_median_step_ms_times_windows_of_back_to_back_steps():
    bench = _load("bench")
    calls = []
    ms = bench.median_step_ms(lambda: calls.append(1), "cpu", repeats=4, warmup=2, window=3)
    assert len(calls) == 2 + 4 * 3 and ms >= 0.0


@pytest.mark.gpu
def test_bench_cores_profile_counts_kernels_on_cuda(tmp_path):
    cores = _load("bench_cores")
    out = tmp_path / "cores"
    cores.main(["seq_lens=256", "heads=2", "head_dim=64", "repeats=1", "warmup=1", "device=cuda", "dtype=bf16",
                "cores=linear", "profile=true", f"out={out}"])
    text = (tmp_path / "cores_profiles.txt").read_text()
    assert "linear @ 256:" in text and "kernels per step" in text and "busy)" in text
