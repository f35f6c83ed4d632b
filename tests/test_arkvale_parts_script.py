"""`benchmarks/arkvale_parts.py` runs end to end on tiny shapes (its kernels under Triton's interpreter, in a
subprocess), writes a row per part and variant, and every row's correctness check holds. Timings on a CPU
mean nothing; this guards the script a GPU call depends on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_checks_every_part(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "benchmarks" / "arkvale_parts.py"), "--device", "cpu", "--small"]
    proc = subprocess.run([*command, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["part"] for row in rows} == {"scores", "select", "recall", "recall_cold", "backup"}
    assert all(row["ok"] for row in rows)
    assert {row["variant"] for row in rows if row["part"] == "recall_cold"} == {"present layout", "page-major layout"}
