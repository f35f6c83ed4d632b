"""`benchmarks/profile_step.py` (a device call's kernel-by-kernel profile of a compiled step) runs end to end on
the CPU: the engine's layer-scope compile, the step runner's warm-up, replays and profiled steps over whole
periods of a cache's flush schedule (KIVI's, 32 steps). Guards the script a GPU call depends on (its
layer-scope path had never run before session 62's call was written); its profiles are benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_tiny_kivi_run_profiles_whole_flush_periods(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    command = [sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--device", "cpu"]
    command += ["--shape", "tiny-llama", "--runs", "kivi:2:256:1", "--replays", "2", "--profiled", "1"]
    command += ["--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "status" not in row, row  # a failed run is written as a row with a status and its error
    assert row["schedule_period"] == 32  # KIVI's group: a flush every 32 steps
    assert row["profiled_steps"] == 32 and row["replay_ms"] > 0 and row["kernels_per_step"] > 0
