"""The test modules' runs under Triton's interpreter, started beside the other tests.

A module of its own, not part of `conftest.py`: pytest loads that file as `conftest` while the test files
import it as `tests.conftest`, two module objects with globals of their own; both import this one module,
so its hooks and the test files share `INTERPRETED_RUNS`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One time-out for every interpreted run, set well above the longest: it only stops a hung one
# (test_quantized_layer.py's run takes ~435 s on one core of the 2-core development machine, 556 s beside
# another test process, and CI machines have run the suite up to 1.3x slower).
INTERPRETER_TIMEOUT_S = 1200


class InterpretedRuns:
    """The test modules' interpreted runs (each a fresh process: Triton reads TRITON_INTERPRET once, at import),
    started on a background thread as soon as collection says which modules need one, so that they use the
    second core while this process runs the other tests. The thread takes them from the last module to run
    backwards; a module that comes up before its run has started runs it itself, and one whose run has
    started waits for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: dict[Path, threading.Event] = {}  # a claimed script -> set when its run has ended
        self.results: dict[Path, subprocess.CompletedProcess] = {}
        self.processes: list[subprocess.Popen] = []
        self.stopping = False
        self.thread: threading.Thread | None = None

    def start(self, scripts: list[Path]) -> None:
        self.thread = threading.Thread(target=self._run_each, args=(scripts[::-1],), daemon=True)
        self.thread.start()

    def _run_each(self, scripts: list[Path]) -> None:
        for script in scripts:
            self._run_unless_claimed(script)

    def _run_unless_claimed(self, script: Path) -> None:
        with self.lock:
            if script in self.done:
                return
            self.done[script] = threading.Event()
            if self.stopping:
                process = None
            else:
                env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
                process = subprocess.Popen(
                    [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                self.processes.append(process)
        try:
            if process is None:
                self.results[script] = subprocess.CompletedProcess([], 1, "", "the test session ended first")
                return
            try:
                stdout, stderr = process.communicate(timeout=INTERPRETER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
                stderr += f"\ntimed out after {INTERPRETER_TIMEOUT_S} s"
            self.results[script] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        finally:
            self.done[script].set()

    def result(self, script: Path) -> subprocess.CompletedProcess:
        self._run_unless_claimed(script)  # here, if the background has not started it
        self.done[script].wait()
        return self.results[script]

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for process in self.processes:
                if process.poll() is None:
                    process.kill()
        if self.thread is not None:
            self.thread.join()


INTERPRETED_RUNS = InterpretedRuns()
