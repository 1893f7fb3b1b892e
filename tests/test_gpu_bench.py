"""bench/gpu_throughput.py in its CPU quick mode: every library samples with the same NFE, fastsample's
samples match k-diffusion's from the same noise, and every row carries images/s and the overhead.

The GPU numbers themselves need a lent GPU (docs/ecosystem.md has the command); this keeps the script
runnable so that the GPU run is one command.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("diffusers")
pytest.importorskip("k_diffusion")


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_throughput", ROOT / "bench" / "gpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_measures_every_library_at_the_same_nfe(tmp_path):
    bench = load_bench()
    result = bench.main(["--quick", "--batches", "8", "--options", "fp32,bf16+cl", "--out", str(tmp_path)])
    checks = result["checks"]
    assert checks["calls"] == {"fastsample": 10, "diffusers": 10, "k-diffusion": 10}
    # the same solver (DPM-Solver++(2M), Karras sigmas) from the same noise: float rounding apart
    assert checks["max_abs_diff_vs_k_diffusion"] < 1e-4
    rows = result["rows"]
    assert {(row["library"], row["options"]) for row in rows} == {
        (library, option) for library in bench.LIBRARIES for option in ("fp32", "bf16+cl")
    }
    for row in rows:
        assert row["batch"] == 8 and row["nfe"] == 10
        assert row["images_per_s"] > 0 and math.isfinite(row["overhead"]) and row["overhead"] > 0
    ours = {row["options"]: row for row in rows if row["library"] == "fastsample"}
    assert all(row["noise_ms"] > 0 for row in ours.values())
    assert ours["fp32"]["max_diff_vs_fp32"] == 0  # the same network and seeds: the same samples
    assert 0 < ours["bf16+cl"]["max_diff_vs_fp32"] < 0.1  # bfloat16 rounding, not a broken run
    assert all(row["host_syncs"] is None for row in rows)  # counted on CUDA only
    written = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert len(written["rows"]) == len(rows)
    assert "| fastsample | fp32 | 8 | 10 |" in (tmp_path / "gpu_throughput.md").read_text()


def test_unknown_option_is_refused():
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--options", "fp8"])


def test_a_failing_library_gives_an_error_row_and_the_run_goes_on(monkeypatch):
    bench = load_bench()
    real = bench.runners

    def fail() -> None:
        raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten\ndetails")

    def with_failure(model, batch, device, steps):
        return {**real(model, batch, device, steps), "diffusers": fail}

    monkeypatch.setattr(bench, "runners", with_failure)
    args = bench.parse_args(["--quick", "--libraries", "fastsample,diffusers"])
    rows = bench.measure(bench.tiny_model(), "fp32", 4, args.device, args)
    assert [row["library"] for row in rows] == ["fastsample", "diffusers"]
    assert rows[0]["overhead"] > 0 and "error" not in rows[0]
    message = "RuntimeError: accessing tensor output of CUDAGraphs that has been overwritten"
    assert rows[1]["error"] == message  # the first line of the message: one table row
    assert bench.format_row(rows[1]).endswith(f"| {message} |")
