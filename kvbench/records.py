"""Run directories and the tidy table built from them.

A run directory holds `config.yaml`, `predictions.jsonl` (one row per sample, written as samples finish)
and `record.json`. The run is complete only once `record.json` exists: it is written last, atomically
(temporary file + rename), so a crash or Ctrl-C never leaves a record that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kvbench

# pandas, torch and transformers load inside the functions that use them: the CLI imports this module
# before the config is checked, and a bad key should not wait seconds for them.
if TYPE_CHECKING:
    import pandas as pd
    import torch

RECORD = "record.json"
CONFIG = "config.yaml"
PREDICTIONS = "predictions.jsonl"


def config_hash(identity: dict[str, Any]) -> str:
    """A short stable hash of what defines a run, so the same config always maps to the same directory."""
    canonical = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def run_dir(results_dir: str | Path, names: dict[str, str], identity: dict[str, Any]) -> Path:
    return Path(results_dir) / names["task"] / names["model"] / f"{names['method']}-{config_hash(identity)}"


def read_record(directory: Path) -> dict[str, Any] | None:
    path = directory / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the whole new one.

    The temporary file is created like any other (mode 0o666 less the umask), not owner-only as
    `tempfile` makes it, so the record is as readable as the run's other files.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def git_commit() -> str:
    """The commit of the kvbench checkout (with `+dirty` for uncommitted changes), or 'unknown'.

    Where the checkout has no `.git` (a copied tree), `KVBENCH_GIT_COMMIT` can say it.
    """
    if os.environ.get("KVBENCH_GIT_COMMIT"):
        return os.environ["KVBENCH_GIT_COMMIT"]
    root = Path(kvbench.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


# Read once, when the code is loaded: a long sweep keeps running the code it started with even if the
# checkout moves on, so its records must name that commit, not the one current at each run.
COMMIT_AT_IMPORT = git_commit()


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux); `platform.processor()` is often empty there."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kvbench": kvbench.__version__,
        "git_commit": COMMIT_AT_IMPORT,
    }
    if device.type == "cuda":  # cuBLAS or cuBLASLt for the products (TORCH_BLAS_PREFER_CUBLASLT=1: the latter)
        env["blas_library"] = torch.backends.cuda.preferred_blas_library().name
    return env


def _flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        if not isinstance(value, dict):
            flat[f"{prefix}{key}"] = value
    return flat


def base_commit(commit: str | None) -> str:
    """The commit without `+dirty`: runs of one commit share it, whatever the working tree held."""
    return str(commit or "unknown").split("+")[0]


def record_row(record: dict[str, Any], directory: Path, current_commit: str = COMMIT_AT_IMPORT) -> dict[str, Any]:
    """One run as a flat row: names, status, metrics, measurements, method and task parameters, the run
    settings that change timings (`model.*`, `kvbench.*`), timings of the run itself and its commit.

    `other_commit` is true when the run's code is not the current checkout's commit (uncommitted changes
    aside, which `dirty` says), so its numbers may not be what this code measures now.
    """
    config = record.get("config") or {}
    commit = (record.get("environment") or {}).get("git_commit")
    row = {
        "task": record["task"],
        "model": record["model"],
        "method": record["method"],
        "status": record["status"],
        "primary_metric": record.get("primary_metric"),
        "higher_is_better": record.get("higher_is_better", True),
        "run_dir": str(directory),
    }
    row.update(_flatten("", record.get("metrics") or {}))
    row["metric_names"] = ",".join(record.get("metrics") or {})  # which columns are the task's metrics
    row.update(_flatten("", record.get("measurements") or {}))
    row.update(_flatten("method.", record.get("method_params") or {}))
    row.update(_flatten("task.", record.get("task_params") or {}))
    row.update(_flatten("model.", config.get("model") or {}))
    row.update(_flatten("kvbench.", {k: v for k, v in (config.get("kvbench") or {}).items() if k in RUN_SETTINGS}))
    row["error"] = record.get("error")
    row["warnings"] = len(record.get("warnings") or [])
    row["wall_s"] = record.get("wall_s")
    row["finished_at"] = record.get("finished_at")
    row["device_name"] = (record.get("environment") or {}).get("device_name")
    row["commit"] = commit
    row["dirty"] = str(commit or "").endswith("+dirty")
    row["other_commit"] = commit is not None and base_commit(commit) != base_commit(current_commit)
    return row


# The `kvbench.*` settings that change what a run measures (where it is written does not).
RUN_SETTINGS = ("engine", "compile_scope", "batch_size", "prefill_chunk", "warmup")


def incomplete_row(directory: Path) -> dict[str, Any]:
    """A run directory without a record: killed, crashed or still running. Names come from its path
    (`<task>/<model>/<method>-<hash>`), which `run_dir` makes."""
    return {
        "task": directory.parent.parent.name,
        "model": directory.parent.name,
        "method": directory.name.rpartition("-")[0],
        "status": "incomplete",
        "run_dir": str(directory),
    }


def load_table(results_dir: str | Path, incomplete: bool = False) -> pd.DataFrame:
    """One row per complete run under `results_dir` (see `record_row`); with `incomplete`, also one per
    run directory that has a config but no record yet (status `incomplete`)."""
    import pandas as pd

    rows = []
    for path in sorted(Path(results_dir).rglob(RECORD)):
        rows.append(record_row(json.loads(path.read_text()), path.parent))
    if incomplete:
        root = Path(results_dir)
        for path in sorted(root.rglob(CONFIG)):
            # Hydra keeps its own config.yaml files under hidden folders (`.hydra/`): not run directories.
            hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
            if not hidden and not (path.parent / RECORD).exists():
                rows.append(incomplete_row(path.parent))
    return pd.DataFrame(rows)
