"""The speed benchmark's smoke mode runs every measurement and ends with its machine-readable line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "speed.py"
KEYS = ["cnn_overhead", "mlp_overhead", "aug_cost", "startup", "folder_epoch2", "folder_rerun", "default_rss_mb"]


def test_speed_benchmark_quick_mode(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch("RESULT " + " ".join(rf"{k}=\d+(\.\d+)?" for k in KEYS), last), last
    values = dict(item.split("=") for item in last.split()[1:])
    assert all(float(v) > 0 for v in values.values())
    assert float(values["folder_rerun"]) < 1  # the second run reads the cache instead of decoding


ACCURACY = Path(__file__).parent.parent / "benchmarks" / "accuracy.py"
ACCURACY_KEYS = ["acc", "auroc", "acc_std", "seeds", "minutes_per_run", "baseline_acc", "baseline_auroc"]


def test_accuracy_benchmark_quick_mode(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ACCURACY), "--quick"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch("RESULT " + " ".join(rf"{k}=\d+(\.\d+)?" for k in ACCURACY_KEYS), last), last
    values = dict(item.split("=") for item in last.split()[1:])
    assert values["seeds"] == "1" and values["acc_std"] == "0.0000"
    assert 0 < float(values["acc"]) <= 1 and 0 < float(values["baseline_auroc"]) <= 1
