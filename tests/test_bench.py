"""The benchmark scripts: the GPU mode's arithmetic, and a CPU dry run so the script cannot rot
while CI has no GPU (the numbers of a dry run mean nothing)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_bench  # noqa: E402


def test_nominal_peaks_and_mfu():
    assert gpu_bench.nominal_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu_bench.nominal_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert gpu_bench.nominal_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert gpu_bench.nominal_peak_tflops("some CPU") is None
    # 1M tokens/s x 1 GFLOP/token = 1 PFLOP/s = half of a 2,000 TFLOP/s peak
    assert gpu_bench.mfu(1e6, 1e9, 2000.0) == pytest.approx(0.5)


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    res = gpu_bench.main(["--device", "cpu", "--dry-run", "--runs", "attn1", "--batch", "2", "--out", str(tmp_path)])
    (row,) = res["rows"]
    assert row["model"] == "attn1" and row["batch"] == 2 and row["tok_s"]["median"] > 0
    assert row["mfu_nominal"] is None and 0 < row["mfu_measured"]
    saved = json.loads((tmp_path / "gpu_results.json").read_text())
    assert saved["rows"][0]["tflops"] == pytest.approx(row["tflops"])
    assert "DRY RUN" in (tmp_path / "gpu_results.md").read_text()


def test_gpu_bench_refuses_without_cuda(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        gpu_bench.main(["--out", str(tmp_path)])
