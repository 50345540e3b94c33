"""The GPU generation benchmark runs end to end on CPU with `--tiny`, and its floor is the hand formula."""

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generation_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("generation_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kv_bytes_per_token_of_llama_7b(bench):
    # K and V, 32 layers, 32 heads x 128 dims, 2 bytes
    assert bench.kv_bytes_per_token(LlamaConfig(**bench.LLAMA_7B), 2) == 2 * 32 * 4096 * 2 == 524_288


def test_decode_floor_by_hand(bench):
    kv = bench.kv_bytes_per_token(LlamaConfig(**bench.TINY), 4)
    assert kv == 2 * 2 * 4 * 64 * 4
    # batch 4, prompt 16, 8 new tokens: mean decode context 16 + 8/2 = 20
    step_bytes, seconds = bench.decode_floor(1_000_000, kv, 4, 16, 8, 1e9)
    assert step_bytes == 1_000_000 + 4096 * 4 * 20
    assert seconds == pytest.approx(1.32768e-3)


@pytest.mark.slow  # a subprocess that loads the package and a model: seconds, not milliseconds
def test_tiny_run_prints_rows_and_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "result.json"
    report = bench.main(["--tiny", "--batches", "1,3", "--prompt-tokens", "12", "--new-tokens", "6",
                         "--out", str(out)])
    rows = {(r["variant"], r["batch"]): r for r in report["rows"]}
    assert len(rows) == 2 * len(bench.VARIANTS)
    for batch in (1, 3):
        for variant in ("hf-dynamic", "manual-eager", "manual-cudagraph"):
            row = rows[(variant, batch)]
            assert row["decode_ms_step"] > 0 and row["pct_floor"] > 0, row
        # The hand-written loop decodes exactly what generate decodes (float32 on the CPU).
        assert rows[("manual-eager", batch)]["same_tokens"] == 1.0
        assert rows[("manual-eager", batch)]["reference"] == "hf-dynamic"
        assert rows[("manual-cudagraph", batch)]["same_tokens"] == 1.0
        # The engine's static backend (eager here) too, against the same reference loop.
        assert rows[("engine-static", batch)]["same_tokens"] == 1.0
        assert rows[("engine-static", batch)]["reference"] == "manual-eager"
        assert rows[("hf-static-compile", batch)]["note"].startswith("skipped")
    weights, kv = report["weight_bytes_read_per_step"], report["kv_bytes_per_token"]
    floor_s = (weights + kv * 3 * (12 + 6 / 2)) / report["bandwidth"]["sum_read_Bps"]
    assert rows[("hf-dynamic", 3)]["floor_ms_step"] == pytest.approx(1e3 * floor_s)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # header + one row each


def test_time_budget_skips_the_rest(bench):
    report = bench.main(["--tiny", "--batches", "1", "--new-tokens", "3", "--time-budget", "0"])
    assert all(r["note"].startswith("skipped: past") for r in report["rows"])


def test_engine_check_finds_the_backends_identical_on_cpu(bench):
    result = bench.check_engine(bench.torch.device("cpu"))
    for name in ("greedy", "sampled, stops, penalties", "sampled, shared prefix"):
        assert result[name]["identical"] == result[name]["of"] == 5, result
    assert result["compiled"] is False  # compiled only on CUDA
