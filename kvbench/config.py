"""Turning a composed Hydra config into typed objects, with every check done before a model loads.

Each config group node names its class in `_target_`; the class's dataclass fields are the only keys
allowed, and each value must match the field's type. Range checks live in the classes' `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from kvbench.errors import ConfigError, report, require
from kvbench.models import ModelConfig

# Method and task classes import torch and transformers (seconds): `build` imports them only after the
# settings and the model config passed, so those errors come back at once.
if TYPE_CHECKING:
    from kvbench.method import Method
    from kvbench.task import Task


@dataclass
class RunSettings:
    """The `kvbench:` section of the config."""

    results_dir: str = "results"
    prefill_chunk: int = 512
    engine: str = "eager"
    compile_scope: str = "layer"  # engine=compiled: one decoder layer compiled and reused, or the whole step
    # engine=compiled: Inductor config values for the step's compile (e.g. combo_kernels: true), checked
    # against torch._inductor.config's keys and types in `build`
    inductor_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 1
    warmup: bool = True
    retry_errors: bool = False
    debug: bool = False
    prefetch_next_model: bool = True

    def __post_init__(self) -> None:
        require(self.prefill_chunk >= 1, "kvbench.prefill_chunk", self.prefill_chunk, "an integer >= 1")
        # The names of kvbench.engine.ENGINES, spelled out so that checking them imports no torch.
        engines = ("eager", "graph", "compiled")
        require(self.engine in engines, "kvbench.engine", self.engine, f"one of {engines}")
        scopes = ("layer", "step")  # kvbench.engine.COMPILE_SCOPES
        require(self.compile_scope in scopes, "kvbench.compile_scope", self.compile_scope, f"one of {scopes}")
        require(self.batch_size >= 1, "kvbench.batch_size", self.batch_size, "an integer >= 1")
        require(
            not self.inductor_options or self.engine == "compiled",
            "kvbench.inductor_options",
            self.inductor_options,
            "empty unless kvbench.engine=compiled",
        )


def check_results_dir(path: str) -> None:
    """`kvbench.results_dir` must be a folder this process can create and write."""
    require(bool(path.strip()), "kvbench.results_dir", path, "a folder path")
    folder = Path(path)
    require(not folder.exists() or folder.is_dir(), "kvbench.results_dir", path, "a folder (this is a file)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("kvbench.results_dir", path, f"a folder that can be created ({error.strerror})") from None
    require(os.access(folder, os.W_OK | os.X_OK), "kvbench.results_dir", path, "a writable folder")


class EarlyChecks(Callback):
    """Hydra callback (configs/config.yaml, `hydra.callbacks`): checks `kvbench.results_dir` before Hydra
    makes its own output folder inside it, where a bad one would end as a traceback from Hydra's `mkdir`."""

    # Set once Hydra has composed the command line (it calls its callbacks only then): an exit before it is
    # a command line Hydra rejected, bad input (`kvbench.__main__`), even where jobs run in other processes.
    composed = False

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        EarlyChecks.composed = True
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        EarlyChecks.composed = True
        self._check(config)
        self._compose_every_job(config)

    @staticmethod
    def _compose_every_job(config: DictConfig) -> None:
        """A sweep job whose overrides do not compose, or set a key its method or task does not take
        (`method.budget` over a method without one), would fail when its turn comes, after the jobs before it
        ran: compose every job first, check its keys, and name the first that fails (exit 2, nothing run). A
        bad value ends its own job only (`kvbench.__main__.job`): the others still run."""
        from hydra import compose

        try:
            jobs = sweep_jobs(config)
        except HydraException:  # a sweep only the sweeper expands: it composes its jobs itself
            return
        for job in jobs:
            try:
                # Overrides of Hydra's own config (launcher, sweeper) need no checking here.
                composed = compose(
                    config.hydra.job.config_name, [o for o in job if not o.lstrip("+~").startswith("hydra")]
                )
            except HydraException as error:
                if config.kvbench.debug:
                    raise
                reason = " ".join(str(error).split())
                print(f"kvbench: error: sweep job '{' '.join(job)}' does not compose: {reason}", file=sys.stderr)
                sys.exit(2)
            try:
                check_keys(composed)
            except ConfigError as error:
                if config.kvbench.debug:
                    raise
                print(f"kvbench: error: sweep job '{' '.join(job)}': {error}", file=sys.stderr)
                sys.exit(2)

    @staticmethod
    def _check(config: DictConfig) -> None:
        try:
            check_results_dir(str(config.kvbench.results_dir))
        except ConfigError as error:
            if config.kvbench.debug:
                raise
            report(error)
            sys.exit(2)


class SweepProgress(Callback):
    """Hydra callback: after each job of a sweep, one line with runs done / total, elapsed and time left.

    Progress is kept as files under the sweep's folder (`.progress/`: the start time and total, then one
    file per finished job), so the count is right whether jobs run in this process (basic launcher), in
    joblib workers or on SLURM nodes sharing the folder. Time left = elapsed / jobs done x jobs left: it
    counts parallel workers without knowing them, and runs skipped as complete make it optimistic.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = _progress_dir(config)
        folder.mkdir(parents=True, exist_ok=True)
        for finished in folder.glob("done-*"):  # a resumed sweep counts its own jobs (skipped ones included)
            finished.unlink(missing_ok=True)
        total = sweep_size(config)
        (folder / "start").write_text(f"{time.time()} {total}")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        folder = _progress_dir(config)
        try:
            started_s, total = (folder / "start").read_text().split()
        except (OSError, ValueError):
            return  # the sweep folder was not made by on_multirun_start (a launcher that skips it)
        done = claim_finish_number(folder)
        print(progress_line(done, int(total), time.time() - float(started_s)), file=sys.stderr, flush=True)


class SweepFolder(Callback):
    """Hydra callback: remembers, in the launching process, the sweep's folder and its size. Jobs that ran in
    other processes (joblib workers, SLURM nodes) leave how they ended in their own folders there
    (`kvbench.__main__`), where the launching process reads them once the sweep is over."""

    OUTCOME_FILE: ClassVar[str] = "outcome.json"  # in each job's folder
    folder: ClassVar[Path | None] = None
    jobs: ClassVar[int] = 0  # 0: unknown (a sweep only the sweeper expands)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepFolder.folder = Path(str(config.hydra.sweep.dir))
        SweepFolder.jobs = sweep_size(config)
        for earlier in SweepFolder.folder.glob(f"*/{self.OUTCOME_FILE}"):  # a sweep folder given again
            earlier.unlink(missing_ok=True)


class GpuPerWorker(Callback):
    """Hydra callback for the joblib launcher over GPUs (configs/hydra/launcher/joblib_gpus.yaml): each
    worker process claims one GPU for all its jobs, before anything there touches CUDA.

    A claim is a file `.gpus/<i>` in the sweep's folder holding the worker's pid, made with O_EXCL so two
    workers never take the same GPU; a claim whose process has died is taken over (loky replaces a
    crashed worker). The GPUs are those of the launching shell (`CUDA_VISIBLE_DEVICES`, else 0..n_jobs-1).
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get(CLAIMED_GPU) is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpus = visible.split(",") if visible else [str(i) for i in range(int(config.hydra.launcher.n_jobs))]
            gpu = claim_gpu(Path(str(config.hydra.sweep.dir)) / ".gpus", gpus)
            os.environ["CUDA_VISIBLE_DEVICES"] = os.environ[CLAIMED_GPU] = gpu
        print(f"kvbench: job {config.hydra.job.num} on GPU {os.environ[CLAIMED_GPU]}", file=sys.stderr, flush=True)


CLAIMED_GPU = "KVBENCH_WORKER_GPU"


def claim_finish_number(folder: Path) -> int:
    """This job's place among the finished ones: the smallest n whose file `done-<n>` this process created
    (O_EXCL). Touching a file per job and then counting them let two jobs ending together both read the
    same count (a sweep of four printed 1, 2, 4, 4)."""
    number = len(list(folder.glob("done-*"))) + 1  # files are only added, so this is never past the answer
    while True:
        try:
            os.close(os.open(folder / f"done-{number}", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            return number
        except FileExistsError:
            number += 1


def claim_gpu(folder: Path, gpus: list[str]) -> str:
    """The first of `gpus` no live process has claimed under `folder`; claimed for this process."""
    folder.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        claim = folder / gpu
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            owner = claim.read_text()
            if not owner or _alive(int(owner)):  # empty: its claimant is writing its pid right now
                continue
            claim.unlink(missing_ok=True)  # its worker died: take it over (O_EXCL still decides a race)
            try:
                fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return gpu
    raise RuntimeError(f"every GPU of {gpus} is claimed by a live worker: more workers (n_jobs) than GPUs")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _progress_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir)) / ".progress"


def _sweep_arguments(config: DictConfig) -> list[str]:
    """What the basic sweeper expands: its `params`, then the command line's overrides (the sweep's config)."""
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    return [*params, *config.hydra.overrides.task]


def sweep_size(config: DictConfig) -> int:
    """How many jobs the basic sweeper makes of the sweep's params and command-line overrides (0: unknown)."""
    choices: dict[str, int] = {}  # the last override of a key wins, as in the sweeper
    try:
        for override in OverridesParser.create().parse_overrides(_sweep_arguments(config)):
            count = len(list(override.sweep_string_iterator())) if override.is_sweep_override() else 1
            choices[override.get_key_element()] = count
    except HydraException:  # a sweep only the sweeper can expand (a glob over a group's options)
        return 0
    return math.prod(choices.values())


def progress_line(done: int, total: int, elapsed_s: float) -> str:
    if total <= 0:
        return f"kvbench sweep: {done} runs done, elapsed {_duration(elapsed_s)}"
    left_s = elapsed_s / done * max(total - done, 0)
    return f"kvbench sweep: {done}/{total} runs done, elapsed {_duration(elapsed_s)}, about {_duration(left_s)} left"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class RunConfig:
    model: ModelConfig
    method: Method
    task: Task
    settings: RunSettings
    names: dict[str, str]  # the config choice behind each of model / method / task


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arm) for arm in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(k, key) and _type_ok(v, item) for k, v in value.items())
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _require_known_keys(cls: type, values: dict[str, Any], group: str) -> None:
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in values.items():
        require(key in fields, f"{group}.{key}", value, f"a known key of {cls.__name__}: {', '.join(fields)}")


def build_dataclass(cls: type, values: dict[str, Any], group: str) -> Any:
    """`cls(**values)` after checking every key and type; errors name `group.key`."""
    _require_known_keys(cls, values, group)
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        require(_type_ok(value, hints[key]), f"{group}.{key}", value, f"a value of type {hints[key]}")
    kwargs = {k: (float(v) if hints[k] is float else v) for k, v in values.items()}
    return cls(**kwargs)


def _target_class(node: dict[str, Any], group: str, base: type) -> type:
    target = node.pop("_target_", None)
    require(bool(target), f"{group}._target_", target, f"the dotted path of a {base.__name__} class")
    module_name, _, class_name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{group}._target_", target, f"an importable {base.__name__} class") from None
    require(
        isinstance(cls, type) and issubclass(cls, base) and dataclasses.is_dataclass(cls),
        f"{group}._target_",
        target,
        f"a dataclass subclassing {base.__name__}",
    )
    return cls


def check_inductor_options(options: dict[str, Any]) -> None:
    """`kvbench.inductor_options` through the engine's own check (each key one of torch._inductor.config's,
    its value of that key's type: a typo would otherwise compile as if it were not there), reported as the
    config key it came from."""
    if not options:
        return
    from kvbench.engine import check_inductor_options as engine_check

    for key, value in options.items():
        try:
            engine_check({key: value}, "compiled")
        except ValueError as error:
            allowed = str(error).removeprefix("inductor_options: ")
            raise ConfigError(f"kvbench.inductor_options.{key}", value, allowed) from None


def build(cfg: DictConfig, names: dict[str, str] | None = None) -> RunConfig:
    """Validate and instantiate everything a run needs from the composed config. Loads no model."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:  # a `???` in a yaml: e.g. model=hf without model.path
        raise ConfigError(str(error.full_key), "???", "required: set it on the command line") from None
    except InterpolationResolutionError as error:
        raise ConfigError(str(error.full_key), None, f"a value that resolves ({error.msg})") from None
    assert isinstance(plain, dict)
    for section in ("model", "method", "task", "kvbench"):
        require(section in plain, section, None, "present in the config (see configs/config.yaml)")
    settings = build_dataclass(RunSettings, plain["kvbench"], "kvbench")
    check_inductor_options(settings.inductor_options)
    model = build_dataclass(ModelConfig, plain["model"], "model")
    from kvbench.method import Method
    from kvbench.task import Task

    method_node, task_node = dict(plain["method"]), dict(plain["task"])
    method_cls = _target_class(method_node, "method", Method)
    task_cls = _target_class(task_node, "task", Task)
    method = build_dataclass(method_cls, method_node, "method")
    task = build_dataclass(task_cls, task_node, "task")
    chosen = {
        "model": model.name,
        "method": method_cls.__module__.rpartition(".")[2],
        "task": task_cls.__module__.rpartition(".")[2],
    }
    chosen.update(names or {})
    chosen["model"] = model_label(model)  # not the group's choice: `model=hf` names no model by itself
    return RunConfig(model, method, task, settings, chosen)


def check_keys(cfg: DictConfig) -> None:
    """Every key of the method and the task is one its class takes (`build`'s first check, nothing built)."""
    from kvbench.method import Method
    from kvbench.task import Task

    for group, base in (("method", Method), ("task", Task)):
        if group not in cfg:  # `build` says so, in the job's own run
            continue
        node = OmegaConf.to_container(cfg[group], resolve=False)
        assert isinstance(node, dict)
        _require_known_keys(_target_class(node, group, base), node, group)


def model_label(model: ModelConfig) -> str:
    """The name a run files its model under (results folder, records, plots): `model.name`, unless it is
    still the `hf` / `gguf` preset's placeholder (the source's own name), which would file every local or hub
    model as one; then the model's own name from its path: a GGUF file's stem, a hub id's last part, or a
    local folder's name (its parent's for a folder named `checkpoint`, where `kvbench.train` writes)."""
    if model.name and model.name != model.source:
        label = _folder_name(model.name)
        # The label is a folder of the results: never "..", nor hidden (index and report skip dot folders).
        require(not label.startswith("."), "model.name", model.name, "a name not starting with '.' (a results folder)")
        return label
    if model.source not in ("hf", "gguf") or not model.path:
        return model.name or model.source
    path = Path(os.path.abspath(model.path))  # absolute, links kept: a linked folder is named by its link
    if model.source == "gguf":
        name = path.stem
    elif path.exists():
        name = path.parent.name if path.name == "checkpoint" else path.name
    else:
        name = model.path.rstrip("/").rpartition("/")[2]
    name = _folder_name(name).lstrip(".")
    return name or model.source


def _folder_name(name: str) -> str:
    """`name` with every character other than letters, digits, '.', '_' and '-' replaced by '_'."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Launchers whose worker processes run many jobs in sweep order: the basic one (this process, one job after
# another) and joblib (each worker takes the first job left when it finishes one). Submitit runs a process
# per job, where a prefetch would be read for nothing.
JOB_REUSING_LAUNCHERS = (
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
)


def sweep_jobs(sweep_config: DictConfig) -> list[list[str]]:
    """Every job's overrides, in the order the basic sweeper makes them: the cartesian product of the swept
    keys, the first key varying slowest (keys in order of first appearance, `params` before the command
    line). Raises HydraException for sweeps only the sweeper expands (a glob over a group's options)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = OverridesParser.create().parse_overrides(_sweep_arguments(sweep_config))
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def next_sweep_model() -> ModelConfig | None:
    """The model of the first job after this one, in sweep order, that uses another model than this job:
    the one this worker will need next, for `model_pool.prefetch`.

    Exact for the basic launcher. A joblib worker takes jobs in sweep order but skips those other workers
    took, so it may never run that model (then the read was for nothing: the pool keeps one model ahead).
    None outside a sweep, when no later job uses another model, with a sweeper or launcher whose order is
    not known (Optuna, submitit), or when a later job's config does not compose (it fails on its own turn).
    The jobs are recomputed from the `multirun.yaml` that the basic sweeper saves before launching; a job
    whose overrides differ from that list's gets no prefetch.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if (
        str(hydra_cfg.mode) != "RunMode.MULTIRUN"
        or hydra_cfg.sweeper.get("_target_") != BASIC_SWEEPER
        or hydra_cfg.launcher.get("_target_") not in JOB_REUSING_LAUNCHERS
    ):
        return None
    try:
        sweep_dir, number = str(hydra_cfg.sweep.dir), int(hydra_cfg.job.num)
        jobs = _saved_sweep_jobs(sweep_dir)
        if number >= len(jobs) or jobs[number] != list(hydra_cfg.overrides.task):
            return None
        current = _job_model(sweep_dir, number, hydra_cfg.job.config_name)
        for later in range(number + 1, len(jobs)):
            model = _job_model(sweep_dir, later, hydra_cfg.job.config_name)
            if model != current:
                return model
        return None
    except Exception as error:  # a prefetch is an optimization: never a reason for this run to fail
        print(f"kvbench: no model prefetch ({type(error).__name__}: {error})", file=sys.stderr, flush=True)
        return None


# Per sweep folder (a process may run several sweeps): its jobs, and each job's model once composed.
_jobs_by_sweep_dir: dict[str, list[list[str]]] = {}
_models_by_job: dict[tuple[str, int], ModelConfig] = {}


def _saved_sweep_jobs(sweep_dir: str) -> list[list[str]]:
    if sweep_dir not in _jobs_by_sweep_dir:
        _jobs_by_sweep_dir[sweep_dir] = sweep_jobs(OmegaConf.load(Path(sweep_dir) / "multirun.yaml"))
    return _jobs_by_sweep_dir[sweep_dir]


def _job_model(sweep_dir: str, number: int, config_name: str) -> ModelConfig:
    """Job `number`'s model config, composed as Hydra composes the job (~0.1-0.3 s, once per job)."""
    from hydra import compose

    if (sweep_dir, number) not in _models_by_job:
        overrides = _saved_sweep_jobs(sweep_dir)[number]
        node = OmegaConf.to_container(compose(config_name=config_name, overrides=overrides).model, resolve=True)
        _models_by_job[sweep_dir, number] = build_dataclass(ModelConfig, node, "model")
    return _models_by_job[sweep_dir, number]
