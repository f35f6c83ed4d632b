"""`benchmarks/speed.py`'s batch `max`: the prediction from a batch-1 row, and the retries when it runs out of memory
(the script's rows themselves need a GPU; here `run_row` is replaced by a stand-in that knows what fits)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed

from kvbench.cache import ModelSpec
from kvbench.methods.cla import CLA
from kvbench.methods.full import Full
from kvbench.methods.h2o import H2O

REPO = Path(__file__).resolve().parents[1]
SPEED = REPO / "benchmarks" / "speed.py"
SCRIPT_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

GIB = 2**30


def batch_one(kv: float, peak: float, host: float = 0) -> dict:
    return {"kv_bytes_device": int(kv * GIB), "kv_bytes_host": int(host * GIB), "peak_allocated_bytes": int(peak * GIB)}


def test_each_sequence_adds_its_cache_to_the_rest_of_the_peak():
    # 17 GiB besides one sequence's cache (weights, a prefill); 4 GiB a sequence; 92% of 140 GiB = 128.8 GiB.
    assert speed.largest_batch(batch_one(4, 21), 140 * GIB, 500 * GIB, None, 64) == (27, "device memory")
    assert speed.largest_batch(batch_one(4, 21), 140 * GIB, 500 * GIB, 40 * GIB, 64) == (10, "kv limit")
    # ArkVale: 15 GiB of host backups a sequence, 125 GiB available -> 7 sequences (0.92 * 125 / 15 = 7.7).
    assert speed.largest_batch(batch_one(0.3, 17, host=15), 140 * GIB, 125 * GIB, None, 64) == (7, "host memory")
    assert speed.largest_batch(batch_one(64, 100), 140 * GIB, 500 * GIB, None, 64) == (1, "device memory")
    assert speed.largest_batch(batch_one(0.25, 17), 140 * GIB, 500 * GIB, None, 64) == (64, "batch limit")


def prefilled_bytes(method, spec: ModelSpec, prompt_len: int = 40) -> int:
    """Device bytes of `method`'s cache after a prompt of random keys and values."""
    cache = method.make_cache(spec, prompt_len, decode_len=8)
    for layer in cache.layers:
        keys = torch.randn(1, spec.num_kv_heads, prompt_len, spec.head_dim)
        layer.update(keys, keys + 1)
    cache.finish_prefill()
    return cache.kv_bytes()[0]


@pytest.mark.parametrize("sharing, exempt", [(2, 0), (2, 1), (3, 0)])
def test_a_shared_cache_is_read_as_often_as_the_dense_one(sharing, exempt):
    # CLA's consumers attend over their producer's keys and values: the step reads a dense cache's bytes
    # from a cache that stores fewer (the floor counted only the stored ones before session 55).
    spec = ModelSpec("six", num_layers=6, num_heads=4, num_kv_heads=2, head_dim=8, max_positions=256)
    dense = prefilled_bytes(Full(), spec)
    cla = CLA(sharing=sharing, exempt_layers=exempt)
    stored = prefilled_bytes(cla, spec)
    assert stored < dense
    assert speed.cache_bytes_read("cla", cla, spec, stored) == dense
    assert speed.cache_bytes_read("full", Full(), spec, dense) == dense
    assert speed.cache_bytes_read("h2o", H2O(budget=16), spec, 400) == 600  # the keys again: half of K + V


def test_retries_shrink_to_distinct_sizes():
    assert speed.retry_sizes(27) == [27, 22, 18]
    assert speed.retry_sizes(2) == [2, 1]
    assert speed.retry_sizes(1) == [1]


@pytest.mark.parametrize("batches", [["1", "4", "max"], ["max"]])
def test_batch_max_runs_the_predicted_batch_then_smaller_ones_until_one_fits(monkeypatch, batches):
    fits = 20  # the stand-in device holds 20 sequences; the prediction (27) does not know that
    calls = []

    def run_row(model, spec, method_name, size, context, batch, engine_name, args, bandwidth, host_bandwidth):
        calls.append(batch)
        row = {"method": method_name, "budget": None, "context": context, "batch": batch, "engine": "compiled"}
        row.update(compile_scope="layer", status="ok" if batch <= fits else "oom")
        if row["status"] == "ok":
            row.update(
                prefill_s=1.0, prefills=1, decode_ms_per_step=5.0, floor_ms=4.0, x_floor=1.25, tokens_per_s=200.0,
                compile_s=2.0, measurement={"decode_s": 0.3},
            )  # fmt: skip
            row.update(batch_one(4 * batch, 17 + 4 * batch))
        return row

    monkeypatch.setattr(speed, "run_row", run_row)
    monkeypatch.setattr(speed, "available_host_memory", lambda: 500 * GIB)
    args = Namespace(
        compile_scope="layer",
        kv_limit_gib=None,
        device_memory_gib=140,
        batch_limit=64,
        commit="test",
        runs=None,
        prefill_chunk=64,
    )
    sweep = speed.Sweep(args, bandwidth=1.0, settings={}, host_bandwidth=1.0)
    sweep.shape, sweep.env, sweep.out = "llama-3.1-8b", {}, io.StringIO()
    for batch in map(speed.parse_batch, batches):
        if batch == speed.MAX_BATCH:
            sweep.record_largest_batch("full", 0, 32768, "compiled", device=None)
        else:
            sweep.record("full", 0, 32768, "compiled", batch)
    given = [int(b) for b in batches if b != "max"]
    assert calls == [*given, 27, 22, 18] if given else calls == [1, 27, 22, 18]  # batch 1 is run once
    notes = [row["largest_batch"] for row in sweep.rows if "largest_batch" in row]
    assert [note["attempt"] for note in notes] == [1, 2, 3]
    assert all(note["predicted"] == 27 and note["bound_by"] == "device memory" for note in notes)
    assert [row["status"] for row in sweep.rows[-3:]] == ["oom", "oom", "ok"]


class StandIn:
    """`run_row` for `speed.main()` without a model: batches up to `fits` run, larger ones run out of memory,
    `fails` fail; the rows numbered in `cut_off` (from 0) come back terminated, those in `timed_out` past
    their time limit; `calls` records each row's (batch, new tokens)."""

    def __init__(
        self,
        fits: int = 20,
        fails: tuple[int, ...] = (),
        cut_off: tuple[int, ...] = (),
        timed_out: tuple[int, ...] = (),
    ) -> None:
        self.fits, self.fails, self.cut_off, self.timed_out, self.calls = fits, fails, cut_off, timed_out, []

    def __call__(
        self, model, spec, method_name, size, context, batch, engine_name, args, bandwidth, host_bandwidth
    ) -> dict:
        self.calls.append((batch, args.new_tokens))
        row = {"method": method_name, "budget": None, "context": context, "batch": batch, "engine": engine_name}
        row["compile_scope"] = "layer"
        if len(self.calls) - 1 in self.cut_off:
            return {**row, "status": "terminated", "elapsed_s": 1.0, "error": "Terminated: signal SIGTERM"}
        if len(self.calls) - 1 in self.timed_out:
            return {**row, "status": "timeout", "elapsed_s": 1.0, "error": "RowTimeout: row time limit of 1 s reached"}
        if batch in self.fails:
            return {**row, "status": "error", "error": "RuntimeError: stand-in"}
        if batch > self.fits:
            return {**row, "status": "oom", "error": "OutOfMemoryError: stand-in"}
        row.update(
            status="ok",
            prefill_s=1.0,
            prefills=1,
            measurement={"decode_s": 0.3},
            decode_ms_per_step=5.0,
            floor_ms=4.0,
            x_floor=1.25,
            tokens_per_s=9.0,
            compile_s=2.0,
        )
        return {**row, **batch_one(4 * batch, 17 + 4 * batch)}


def run_main(monkeypatch, stand_in: StandIn, out: Path, *argv: str) -> list[dict]:
    """`speed.main()` on CPU with `stand_in` for the rows; returns every row of `out` (lines that parse)."""
    monkeypatch.setattr(sys, "argv", ["speed.py", "--device", "cpu", "--out", str(out), "--device-memory-gib", "140"])
    if "--commit" not in argv:
        argv = (*argv, "--commit", "c0")
    monkeypatch.setattr(sys, "argv", [*sys.argv, *argv])
    monkeypatch.setattr(speed, "run_row", stand_in)
    monkeypatch.setattr(speed, "copy_bandwidth", lambda device: 1.0)
    monkeypatch.setattr(speed, "host_read_bandwidth", lambda device: 1.0)
    monkeypatch.setattr(speed, "available_host_memory", lambda: 500 * GIB)
    monkeypatch.setattr(speed.Sweep, "load", lambda self, shape, device: self.__dict__.update(shape=shape, env={}))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        speed.main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]


RUNS = ["tiny-llama:full:0:64:1", "tiny-llama:full:0:64:2", "tiny-llama:full:0:64:max", "tiny-llama:full:0:64:3"]


def test_resume_runs_only_what_the_output_has_not_finished(monkeypatch, tmp_path):
    """`--resume`: rows finished under the same settings ("ok"; out of memory at a fixed batch, or at batch max
    on its last size) are not run again; a failed row is; a row's `run` is its plan entry as `--runs` writes it."""
    out = tmp_path / "rows.jsonl"
    first = StandIn(fits=2, fails=(3,))  # batch max: 27 predicted, then 22 and 18, all out of memory
    rows = run_main(monkeypatch, first, out, "--runs", *RUNS)
    assert [call for call, _ in first.calls] == [1, 2, 27, 22, 18, 3]
    assert [row["run"].split(":")[4] for row in rows] == ["1", "2", "max", "max", "max", "3"]
    assert rows[0]["run"] == "tiny-llama:full:0:64:1:compiled"
    again = StandIn(fits=3)
    rows = run_main(monkeypatch, again, out, "--runs", *RUNS, "--resume")
    assert [call for call, _ in again.calls] == [3]  # the failed row, and nothing else
    assert rows[-1]["status"] == "ok"
    never = StandIn()
    run_main(monkeypatch, never, out, "--runs", *RUNS, "--resume")
    assert never.calls == []


def test_resume_needs_the_same_settings_and_counts_repeated_entries(monkeypatch, tmp_path):
    """Rows written under other settings (here `--new-tokens`) finish nothing; an entry the plan repeats
    runs as often as it is repeated, less the rows that finished it."""
    out = tmp_path / "rows.jsonl"
    run_main(monkeypatch, StandIn(), out, "--runs", RUNS[0])
    other = StandIn()
    run_main(monkeypatch, other, out, "--runs", RUNS[0], "--resume", "--new-tokens", "8")
    assert other.calls == [(1, 8)]
    twice = StandIn()
    run_main(monkeypatch, twice, out, "--runs", RUNS[0], RUNS[0], RUNS[0], "--resume")
    assert twice.calls == [(1, 48), (1, 48)]  # three asked for, one finished with 48 tokens


def test_a_terminated_row_in_the_file_does_not_stop_the_resumed_run(monkeypatch, tmp_path):
    """A row cut off in an earlier run (here the second of a repeated entry) is run again; only a row cut off
    in this run stops it."""
    out = tmp_path / "rows.jsonl"
    with pytest.raises(SystemExit):  # the earlier run: terminated in its second row
        run_main(monkeypatch, StandIn(cut_off=(1,)), out, "--runs", RUNS[0], RUNS[0])
    again = StandIn()
    rows = run_main(monkeypatch, again, out, "--runs", RUNS[0], RUNS[0], "--resume")
    assert [call for call, _ in again.calls] == [1]
    assert [row["status"] for row in rows] == ["ok", "terminated", "ok"]
    run_main(monkeypatch, StandIn(), out, "--runs", RUNS[0], RUNS[0], "--resume")  # nothing left: exits 0


def test_a_time_out_that_breaks_torch_stops_the_run(monkeypatch, tmp_path, capsys):
    """A row cut off by its time limit inside torch's Python dispatcher can leave every later torch operation
    failing: the run then starts no new row (they would all be written as errors) and exits with an error;
    `--resume` runs the rest. A time-out that leaves torch working does not stop the run."""
    rows = run_main(monkeypatch, StandIn(timed_out=(0,)), tmp_path / "working.jsonl", "--runs", RUNS[0], RUNS[0])
    assert [row["status"] for row in rows] == ["timeout", "ok"]
    out = tmp_path / "rows.jsonl"
    monkeypatch.setattr(speed, "torch_fails", lambda device: "RuntimeError: Hit PythonDispatcher dispatch key")
    broken = StandIn(timed_out=(0,))
    with pytest.raises(SystemExit, match="the row cut off and 1 more of the plan not run"):
        run_main(monkeypatch, broken, out, "--runs", RUNS[0], RUNS[0])
    assert len(broken.calls) == 1
    assert "a cut-off left torch unusable" in capsys.readouterr().out
    monkeypatch.setattr(speed, "torch_fails", lambda device: None)
    again = StandIn()
    rows = run_main(monkeypatch, again, out, "--runs", RUNS[0], RUNS[0], "--resume")
    assert len(again.calls) == 2 and [row["status"] for row in rows] == ["timeout", "ok", "ok"]


def test_batch_max_where_not_even_one_sequence_fits_is_finished(monkeypatch, tmp_path):
    """Batch max whose batch-1 row runs out of memory writes no max row; resumed, it is not run again."""
    out = tmp_path / "rows.jsonl"
    rows = run_main(monkeypatch, StandIn(fits=0), out, "--runs", RUNS[2])
    assert [(row["batch"], row["status"]) for row in rows] == [(1, "oom")]
    again = StandIn(fits=0)
    run_main(monkeypatch, again, out, "--runs", RUNS[2], "--resume")
    assert again.calls == []


def test_resume_refuses_an_unknown_commit(monkeypatch, tmp_path):
    """A copy without .git and no --commit: rows of any code would pass for this code's."""
    environment = speed.environment
    monkeypatch.setattr(speed, "environment", lambda device: {**environment(device), "git_commit": "unknown"})
    with pytest.raises(SystemExit, match="--commit"):
        run_main(monkeypatch, StandIn(), tmp_path / "rows.jsonl", "--runs", RUNS[0], "--resume", "--commit", "")


def test_batch_max_cut_off_between_attempts_runs_again(monkeypatch, tmp_path):
    """Batch max whose last row is an out-of-memory attempt with sizes left (the run stopped between attempts)
    is not finished: it runs again, predicted from the batch-1 row the file holds."""
    out = tmp_path / "rows.jsonl"
    rows = run_main(monkeypatch, StandIn(fits=20), out, "--runs", RUNS[2])
    assert [row["batch"] for row in rows] == [1, 27, 22, 18]
    out.write_text("\n".join(json.dumps(row) for row in rows[:2]) + "\n")  # batch 1, then attempt 1 of 3
    again = StandIn(fits=20)
    run_main(monkeypatch, again, out, "--runs", RUNS[2], "--resume")
    assert [call for call, _ in again.calls] == [27, 22, 18]  # batch 1 not run again


def test_a_line_cut_short_is_skipped_and_the_next_row_starts_a_line(monkeypatch, tmp_path):
    """A crash mid-write leaves a line without its end: `--resume` skips it, and the next row is written on a
    line of its own, readable."""
    out = tmp_path / "rows.jsonl"
    rows = run_main(monkeypatch, StandIn(), out, "--runs", RUNS[0])
    out.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0])[:40])
    again = StandIn()
    run_main(monkeypatch, again, out, "--runs", RUNS[0], RUNS[1], "--resume")
    assert [call for call, _ in again.calls] == [2]
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["batch"] == 2


def test_bad_batch_is_refused_with_what_is_allowed():
    with pytest.raises(Exception, match="a positive integer or max"):
        speed.parse_batch("0")
    with pytest.raises(SystemExit):
        speed.parse_runs(["llama-3.1-8b:full:0:32768:lots"])


def test_a_failed_row_keeps_the_end_of_its_error_for_reading_off_the_gpu():
    """The table shows the first line; the row keeps the message's end, where Inductor names the kernel
    source line that failed (a GPU session's rows are read later, on a machine without the GPU)."""
    source = "\n".join(f"    line {i}" for i in range(1000))  # longer than the detail kept
    error = RuntimeError(f"CompilationError: at 105:4:\n{source}\nNameError('_helper is not defined')")
    got = speed.failure(error)
    assert got["error"] == "RuntimeError: CompilationError: at 105:4:"
    assert got["error_detail"].endswith("NameError('_helper is not defined')")
    assert len(got["error_detail"]) <= speed.ERROR_DETAIL_CHARS


def test_a_row_past_its_time_limit_is_written_with_where_it_was(tmp_path):
    """A row cut off by `--row-time-limit-s` is a row: status "timeout", its elapsed time, its innermost
    frames and the innermost of kvbench's own, for a compiled row and an eager one."""
    out = tmp_path / "rows.jsonl"
    runs = ["tiny-llama:full:0:64:1", "tiny-llama:full:0:64:1:eager"]  # compiled first, then eager
    command = [sys.executable, str(SPEED), "--device", "cpu", "--runs", *runs, "--new-tokens", "2000"]
    command += ["--row-time-limit-s", "0.5", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=SCRIPT_ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["engine"] for row in rows] == ["compiled", "eager"]
    for row in rows:
        assert row["status"] == "timeout" and row["error"] == "RowTimeout: row time limit of 0.5 s reached", row
        assert 0.5 <= row["elapsed_s"] < 60
        assert row["where"][-1].endswith(" expire")  # the innermost frame: the timer's handler
        # kvbench's own innermost frame (the engine, a cache, a method: wherever the timer struck), not the
        # handler in speed.py
        assert row["in_kvbench"].startswith("kvbench/") and "speed.py" not in row["in_kvbench"], row["where"]


@pytest.mark.parametrize("during", ["row", "load"])
def test_sigterm_writes_the_row_in_progress_and_starts_no_other(monkeypatch, tmp_path, during):
    """SIGTERM (what `timeout` sends) during a row: the row is written as "terminated"; during a shape's
    load (between rows): no row. Either way no later row starts, and the process exits with the shell's code
    for SIGTERM."""
    started = []

    def stop() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the run")

    class StoppedEngine:  # stands in for the engine: the signal arrives while it generates
        def __init__(self, *args, **kwargs) -> None:
            pass

        def generate_batch(self, requests) -> None:
            started.append(len(requests))
            stop()

    class Model:
        def get_input_embeddings(self):
            return torch.nn.Embedding(32, 4)

    def load(self, shape, device) -> None:
        if during == "load":
            stop()
        self.shape, self.model, self.spec, self.env = shape, Model(), None, {}

    out = tmp_path / "rows.jsonl"
    argv = ["speed.py", "--device", "cpu", "--runs", "tiny-llama:full:0:64:1", "tiny-llama:full:0:64:2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    monkeypatch.setattr(speed, "Engine", StoppedEngine)
    monkeypatch.setattr(speed, "copy_bandwidth", lambda device: 1.0)
    monkeypatch.setattr(speed, "host_read_bandwidth", lambda device: 1.0)
    monkeypatch.setattr(speed.Sweep, "load", load)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stopped:
            speed.main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    if during == "load":
        assert started == [] and rows == []
        return
    assert started == [1]  # the batch-2 row never started
    (row,) = rows
    assert row["status"] == "terminated" and row["error"] == "Terminated: signal SIGTERM"
    assert row["in_kvbench"] is None and row["where"][-1].endswith("terminate")


CUT_OFF_IN_A_TRACE = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
import speed
def long_trace(x):
    for _ in range(100_000):  # unrolled by dynamo: far longer to trace than the limit
        x = x + 1
    return x
compiled = torch.compile(long_trace, backend="eager", fullgraph=True)
try:
    with speed.row_deadline(0.2):
        compiled(torch.zeros(2))
except BaseException as error:
    print(type(error).__name__)
"""


def test_a_cut_off_passes_through_dynamo_unwrapped():
    """The timer striking while dynamo traces (a compiled row's first seconds) reaches the row as itself: an
    Exception raised there would come back as dynamo's InternalTorchDynamoError and the row read "error". In a
    process of its own: struck inside dynamo's Python dispatcher, the cut-off can leave torch's dispatch state
    broken for every later operation of the process (once in CI, session 59: 41 later tests failed)."""
    command = [sys.executable, "-c", CUT_OFF_IN_A_TRACE, str(SPEED.parent)]
    done = subprocess.run(command, capture_output=True, text=True, env=SCRIPT_ENV, timeout=300)
    assert done.stdout.split() == ["RowTimeout"], (done.stdout, done.stderr[-2000:])


BROKEN_DISPATCH = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
import speed
print(speed.torch_fails(torch.device("cpu")))
# the state session 59's CI run was left in: the Python dispatcher's key on, its thread-local dispatcher unset
torch._C._dispatch_tls_set_dispatch_key_included(torch._C.DispatchKey.PythonDispatcher, True)
print(speed.torch_fails(torch.device("cpu")))
"""


def test_the_probe_finds_the_dispatch_state_a_cut_off_can_leave():
    """`torch_fails` is None in a sound process and an error in one whose dispatch state is what a cut-off
    inside dynamo's Python dispatcher left (session 59: "Hit PythonDispatcher dispatch key but
    PythonDispatcherTLS was not set" from every later operation). In a process of its own."""
    command = [sys.executable, "-c", BROKEN_DISPATCH, str(SPEED.parent)]
    done = subprocess.run(command, capture_output=True, text=True, env=SCRIPT_ENV, timeout=300)
    sound, broken = done.stdout.strip().split("\n")[-2:]
    assert sound == "None", (done.stdout, done.stderr[-2000:])
    assert broken.startswith("RuntimeError") and "PythonDispatcher" in broken, (done.stdout, done.stderr[-2000:])


def test_a_launch_other_than_the_default_compiles_without_the_caches(monkeypatch):
    """torch.compile's on-disk caches key a graph on its operators, not on the launch the 4-bit kernels were
    chosen under: a `--quant-launch` row must not read (or leave) a graph compiled under another launch."""
    import torch._functorch.config
    import torch._inductor.config

    from kvbench import quant_kernels

    monkeypatch.setattr(quant_kernels, "LAUNCH", quant_kernels.LaunchConfig())
    with (
        torch._inductor.config.patch(fx_graph_cache=True),
        torch._functorch.config.patch(enable_autograd_cache=True),
        torch.compiler.config.patch(force_disable_caches=False),
    ):
        speed.use_quant_launch([])
        assert torch._inductor.config.fx_graph_cache and torch._functorch.config.enable_autograd_cache
        assert not torch.compiler.config.force_disable_caches
        speed.use_quant_launch(["pair_sets=0"])
        assert not quant_kernels.LAUNCH.pair_sets
        assert not torch._inductor.config.fx_graph_cache and not torch._functorch.config.enable_autograd_cache
        # environment variables can force those two on; this switch comes first in both caches' checks
        assert torch.compiler.config.force_disable_caches


def test_a_batch_shares_one_prompt_prefilled_once_unless_asked_for_distinct_ones(tmp_path):
    """The batch's sequences share one prompt, prefilled once (`prefills` 1, its prefill time per sequence
    prefilled); `--distinct-prompts` prefills each sequence. Decode tokens per step are the batch's either way."""
    rows = {}
    for flag in ([], ["--distinct-prompts"]):
        out = tmp_path / f"rows{len(flag)}.jsonl"
        command = [sys.executable, str(SPEED), "--device", "cpu", "--runs", "tiny-llama:full:0:64:3:eager"]
        command += ["--new-tokens", "4", "--out", str(out), *flag]
        done = subprocess.run(command, capture_output=True, text=True, env=SCRIPT_ENV, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        (row,) = [json.loads(line) for line in out.read_text().splitlines()]
        rows[bool(flag)] = row
    assert rows[False]["status"] == rows[True]["status"] == "ok"
    assert rows[False]["prefills"] == 1 and rows[True]["prefills"] == 3
    assert rows[False]["prefill_s"] > 0 and rows[True]["prefill_s"] > 0
    # shared: the one sequence prefilled (the first, whose measurement the row keeps), not a mean over three
    assert rows[False]["prefill_s"] == rows[False]["measurement"]["prefill_s"]


def test_quant_launch_reads_flags_integers_and_pairs():
    """`--quant-launch FIELD=VALUE`: booleans as 0/1, integers, pairs as "6,12"; a pair of the wrong length or
    an unknown field is refused naming it."""
    launch = speed.quant_launch(["codes_first=0", "block_n=32", "halves_programs_per_sm=4,8"])
    assert (launch.codes_first, launch.block_n, launch.halves_programs_per_sm) == (False, 32, (4, 8))
    with pytest.raises(SystemExit, match="halves_programs_per_sm"):
        speed.quant_launch(["halves_programs_per_sm=6"])
    with pytest.raises(SystemExit, match="nope"):
        speed.quant_launch(["nope=1"])


def test_compile_parts_are_each_rows_own_and_sum_to_its_compile_seconds(tmp_path):
    """A compiled row splits its `compile_s` into Dynamo's tracing, the backend and the rest (warm-up and
    capture), which sum to it, from torch's compile timers: a row's own, since each row resets Dynamo (which
    clears them), so two identical rows in one run count the same graphs, not the second both rows'. The
    row's wall time (`row_s`) holds its parts, and the run's last line splits its wall time."""
    out = tmp_path / "rows.jsonl"
    command = [sys.executable, str(SPEED), "--device", "cpu", "--new-tokens", "3", "--out", str(out)]
    command += ["--runs", "tiny-llama:full:0:64:1:compiled", "tiny-llama:full:0:64:1:compiled"]
    done = subprocess.run(command, capture_output=True, text=True, env=SCRIPT_ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["status"] for row in rows] == ["ok", "ok"]
    for row in rows:
        parts = row["compile_parts"]
        assert parts["graphs"] >= 1 and parts["trace_s"] > 0 and parts["backend_s"] > 0
        seconds = parts["trace_s"] + parts["backend_s"] + parts["outside_s"]
        assert seconds == pytest.approx(row["compile_s"], rel=1e-6, abs=1e-6)
        assert parts["kernel_compile_s"] <= parts["backend_s"] and parts["inductor_s"] <= parts["backend_s"]
    assert rows[1]["compile_parts"]["graphs"] == rows[0]["compile_parts"]["graphs"]
    # each row's wall time holds its compile, prefill and decode; the run's split of its wall adds up to it
    for row in rows:
        assert row["row_s"] >= row["compile_s"] + row["prefill_s"] * row["prefills"] + row["measurement"]["decode_s"]
    wall = next(line for line in done.stdout.splitlines() if line.startswith("wall "))
    total, _, split = wall.removeprefix("wall ").partition(" s: ")
    seconds = {part.rsplit(" ", 2)[0]: float(part.rsplit(" ", 2)[1]) for part in split.split(", ")}
    assert set(seconds) == {"compile", "prefill", "decode", "rest of rows", "between rows"}
    assert seconds["compile"] == pytest.approx(sum(row["compile_s"] for row in rows), abs=1)
    assert sum(seconds.values()) == pytest.approx(float(total), abs=3)  # six numbers, each rounded to 1 s


def test_the_wall_split_counts_each_part_once():
    """A run's wall time split: a finished row's compile, its prefill once for each sequence prefilled, its
    timed decode; the rest of every row's own time (a failed row's too); what lay between rows."""
    done = {"status": "ok", "compile_s": 2.0, "prefill_s": 1.5, "prefills": 2, "measurement": {"decode_s": 0.5}}
    rows = [done | {"row_s": 7.0}, {"status": "oom", "row_s": 1.0}]
    parts = speed.wall_split(rows, wall_s=10.0)
    assert parts == {"compile": 2.0, "prefill": 3.0, "decode": 0.5, "rest of rows": 2.5, "between rows": 2.0}


def test_host_reads_get_their_own_floor_over_the_host_link(monkeypatch, tmp_path):
    """ArkVale's recalls cross the host link: a row counts their bytes a step (each sequence's recalled pages
    times the batch, over the generation's new_tokens - 1 decode steps), their floor at the measured host
    bandwidth (here a slow stand-in, so that it is the larger floor) and the step against the larger floor; a
    method that reads nothing from host keeps its floor."""
    out, new_tokens, batch, host_bandwidth = tmp_path / "rows.jsonl", 5, 2, 1e6
    argv = ["speed.py", "--device", "cpu", "--new-tokens", str(new_tokens), "--out", str(out)]
    argv += ["--runs", f"tiny-llama:arkvale:256:640:{batch}:eager", f"tiny-llama:full:0:640:{batch}:eager"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(speed, "host_read_bandwidth", lambda device: host_bandwidth)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        speed.main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    arkvale, full = [json.loads(line) for line in out.read_text().splitlines()]
    assert arkvale["status"] == full["status"] == "ok"
    # tiny-llama: 2 KV heads of 32 channels, float32 on a CPU; ArkVale's pages are 32 tokens, one group
    page_bytes = 32 * 2 * (32 + 32) * 4
    recalled = arkvale["method_stats"]["pages_recalled"]
    assert recalled > 0
    expected = recalled * page_bytes * batch / (new_tokens - 1)
    assert arkvale["host_read_bytes_per_step"] == pytest.approx(expected)
    host_floor = 1000 * expected / host_bandwidth
    assert arkvale["host_bandwidth_bytes_per_s"] == host_bandwidth
    assert arkvale["host_floor_ms"] == pytest.approx(host_floor) and host_floor > arkvale["floor_ms"]
    assert arkvale["floor_with_host_ms"] == pytest.approx(host_floor)
    ratio = arkvale["decode_ms_per_step"] / host_floor
    assert arkvale["x_floor_with_host"] == pytest.approx(ratio)
    assert full["host_read_bytes_per_step"] == 0 and full["floor_with_host_ms"] == full["floor_ms"]
