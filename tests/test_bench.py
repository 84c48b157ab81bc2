"""benchmarks/bench.py --quick runs to the end and prints every table (no timing is asserted: CI machines vary).

It needs TRL (benchmarks/requirements-bench.txt, installed by .ci/run) for the GRPOTrainer step table;
uft.py itself never imports TRL.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TABLES = [
    "## Peak memory of `python uft.py`",
    "## Machine: matmul throughput",
    "## Sampler: `uft.generate` vs `model.generate`",
    "| uft tok/s",                                  # the sampler table's header
    "identical (asserted)",                         # greedy tokens equal model.generate's
    "| plain draw tok/s",                           # the one-log-softmax ablation
    "## KV cache vs no cache",
    "| DynamicCache ms/token",                      # the preallocated-cache ablation
    "## Training step: UFT (`uft.train`) vs TRL `GRPOTrainer`",
    "| TRL GRPOTrainer ",                           # the TRL step row
    "## UFT step on a real model",
    "| scoring s",
    "## Model shapes on cpu",
    "| tiny ",
    "## Targets",
    "TARGET UFT step >= ",
    "Total benchmark time",
]


@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="TRL not installed: pip install -r benchmarks/requirements-bench.txt")
def test_quick_benchmark_runs_and_prints_every_table(tmp_path):
    report = tmp_path / "results.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--out", str(report)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = report.read_text()
    for heading in TABLES:
        assert heading in proc.stdout, f"{heading!r} missing from bench.py --quick output"
        assert heading in written, f"{heading!r} missing from the written report"
    assert "NOT MET (" in written or "MET (" in written
    assert "TRL not installed" not in written
    assert (tmp_path / "cache_scaling.png").is_file()
