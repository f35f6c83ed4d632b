"""LongBench v1/E/v2 data errors surface before any model loads, in one line; the data's sha256 is in the run's
identity. The hub is simulated (offline switch, empty cache, failing download): no test needs the network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import kvbench.run as run_module
from kvbench.config import build
from kvbench.errors import ConfigError
from kvbench.models import model_spec
from tests.conftest import compose_config

TINY = ("model=tiny-llama", "model.device=cpu")
V1_RECORD = {"context": "A passage.", "input": "A question?", "answers": ["x"], "length": 3, "all_classes": None}
V2_RECORD = {"_id": "q1", "domain": "d", "sub_domain": "s", "difficulty": "easy", "length": "short",
             "question": "Which?", "choice_A": "a", "choice_B": "b", "choice_C": "c", "choice_D": "d", "answer": "A",
             "context": "A document."}  # fmt: skip


@pytest.fixture
def no_model_loads(monkeypatch):
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and a hub client that fails the test if it goes past the cache."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    real = huggingface_hub.hf_hub_download

    def cache_only(*args, **kwargs):
        assert kwargs.get("local_files_only"), "the hub was contacted"
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)


def run_task(tmp_path: Path, *overrides: str) -> ConfigError:
    """Run with these overrides; return the ConfigError it must raise, after checking nothing was written."""
    results = tmp_path / "results"
    with pytest.raises(ConfigError) as caught:
        run_module.run(compose_config(*TINY, f"kvbench.results_dir={results}", *overrides))
    assert not results.exists() or not any(results.iterdir())
    return caught.value


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----- hub data that is not there -----
@pytest.mark.parametrize("task", ["longbench", "longbench_e", "longbench_v2"])
@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_without_cached_data_is_one_line_before_loading(
    task, switch, monkeypatch, tmp_path, empty_hub_cache, no_model_loads, capsys
):
    from huggingface_hub import constants

    if switch == "HF_HUB_OFFLINE":  # huggingface_hub reads it at import, so the test sets its constant
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    error = run_task(tmp_path, f"task={task}")
    message = str(error)
    assert error.key == "task.data_dir" and "\n" not in message
    assert "not cached and the hub is offline" in message and "pass task.data_dir=" in message
    assert "Retrying" not in capsys.readouterr().err


def test_unreachable_hub_is_one_line_before_loading(monkeypatch, tmp_path, empty_hub_cache, no_model_loads, capsys):
    import huggingface_hub.utils
    from huggingface_hub import constants

    class NoNetwork:
        def head(self, url, timeout):
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", NoNetwork)
    error = run_task(tmp_path, "task=longbench")  # `empty_hub_cache` fails the test if a download is tried
    assert error.key == "task.data_dir" and "\n" not in str(error)
    assert "THUDM/LongBench/data.zip is not cached and the hub is unreachable (ConnectionError)" in str(error)
    assert "Retrying" not in capsys.readouterr().err


def test_a_failed_download_is_one_line_before_loading(monkeypatch, tmp_path, no_model_loads):
    import huggingface_hub
    import huggingface_hub.utils
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    class Hub:
        def head(self, url, timeout):
            return None  # it answers

    def download(*args, local_files_only=False, **kwargs):  # not cached; then the download fails
        raise LocalEntryNotFoundError("not cached") if local_files_only else OSError("connection reset")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", Hub)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    error = run_task(tmp_path, "task=longbench_v2")
    assert "THUDM/LongBench-v2/data.json is not cached and cannot be downloaded (OSError)" in str(error)


# ----- broken files -----
def test_corrupt_jsonl_line_names_file_and_line_before_loading(tmp_path, no_model_loads):
    good = json.dumps(V1_RECORD)
    write_lines(tmp_path / "lb" / "multi_news.jsonl", [good, good])
    broken = write_lines(tmp_path / "lb" / "hotpotqa.jsonl", [good, "", good[:-9], good])  # line 3 cut short
    overrides = ("task=longbench", f"task.data_dir={tmp_path / 'lb'}", "task.subtasks=[multi_news,hotpotqa]")
    error = run_task(tmp_path, *overrides)
    assert error.key == "task.data_dir" and "\n" not in str(error)
    assert f"{broken} line 3 is not JSON" in str(error)
    # a record without a field the task reads
    write_lines(broken, [good, json.dumps({"context": "c", "input": "i"})])
    assert f"{broken} line 2: lacks answers" in str(run_task(tmp_path, *overrides))
    # LongBench-E also needs `length`, for its buckets
    write_lines(tmp_path / "e" / "qasper_e.jsonl", [json.dumps({k: v for k, v in V1_RECORD.items() if k != "length"})])
    error = run_task(tmp_path, "task=longbench_e", f"task.data_dir={tmp_path / 'e'}", "task.subtasks=[qasper]")
    assert "qasper_e.jsonl line 1: lacks length" in str(error)


def test_v2_corrupt_records_name_file_and_place_before_loading(tmp_path, no_model_loads):
    folder = tmp_path / "v2"
    overrides = ("task=longbench_v2", f"task.data_dir={folder}")
    path = write_lines(folder / "part.jsonl", [json.dumps(V2_RECORD), "{not json"])
    error = run_task(tmp_path, *overrides)
    assert error.key == "task.data_dir" and f"{path} line 2 is not JSON" in str(error)
    path.unlink()
    data = folder / "data.json"  # the official layout: one JSON list; the second record lacks its "}"
    data.write_text("[\n" + json.dumps(V2_RECORD) + ",\n" + json.dumps(V2_RECORD)[:-1] + "\n]")
    assert f"{data} is not JSON (line 4, column 1" in str(run_task(tmp_path, *overrides))
    data.write_text(json.dumps([V2_RECORD, {k: v for k, v in V2_RECORD.items() if k != "answer"}]))
    assert f"{data} record 1: lacks answer" in str(run_task(tmp_path, *overrides))


# ----- the data's fingerprint in the run's identity -----
@pytest.mark.parametrize(
    ("overrides", "file", "record"),
    [(("task=longbench", "task.subtasks=[multi_news]"), "multi_news.jsonl", V1_RECORD),
     (("task=longbench_v2",), "data.json", V2_RECORD)],
)  # fmt: skip
def test_a_changed_data_file_is_a_new_run(overrides, file, record, tmp_path):
    path = tmp_path / "data" / file

    def identity() -> dict:
        config = build(compose_config(*TINY, *overrides, f"task.data_dir={path.parent}"))
        config.task.check(model_spec(config.model), config.method)
        return run_module.identity(config)

    text = json.dumps([record]) if file == "data.json" else json.dumps(record)
    write_lines(path, [text])
    before = identity()
    assert before["task"]["data_sha256"] == {file: hashlib.sha256(path.read_bytes()).hexdigest()}
    assert identity() == before  # the same data: the same run
    changed = text.replace('"x"', '"y"').replace('"a"', '"another"')  # v1's answer, or v2's choice_A
    assert changed != text
    write_lines(path, [changed])
    assert identity()["task"]["data_sha256"] != before["task"]["data_sha256"]
