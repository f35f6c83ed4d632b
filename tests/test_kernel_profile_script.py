"""`benchmarks/kernel_profile.py` (the call Nsight Compute profiles on a GPU) runs on tiny shapes under Triton's
interpreter and names the plane kernel's key mode it ran for each layout. Guards the script a GPU call
depends on; its profiles are benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize(
    ("layout", "modes"),
    [
        ("kivi2", "['halves']"),
        ("int4_token", "['token']"),
        ("int2_token", "['token']"),
        ("zipcache_4_2", "['lead', 'lead']"),
    ],
)
def test_tiny_run_names_its_key_modes(layout: str, modes: str) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "benchmarks" / "kernel_profile.py"), "--device", "cpu", "--layout", layout]
    command += ["--batch", "1", "--context", "256", "--calls", "1"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"key modes {modes}" in proc.stdout, proc.stdout
