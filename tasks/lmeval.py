"""Any lm-evaluation-harness task inside a kvbench run: `task=lmeval task.name=<lm-eval task>`.

lm-eval builds the task's requests (prompts, few-shot examples, choices) as `lm_eval` builds them; kvbench
answers them through `KVBenchLM` (kvbench/lmeval.py), the method's cache in effect. One lm-eval document is one
kvbench sample: its requests are answered together (`kvbench.batch_size` documents at a time, their generation
requests decoded in batches of that size), then lm-eval's filters and `process_results` give the document's
metric values, which form one prediction row with the document's measured bytes and timings. The run's metrics
are lm-eval's aggregations of those values, named as lm-eval names them (`acc,none`,
`exact_match,strict-match`); the first metric of the task's first filter is the primary one. The same model,
method and task score the same as `python -m kvbench.lmeval --model kvbench` (tested).

Local data works as in lm-eval: a task YAML whose `dataset_path`/`dataset_kwargs.data_files` name local files,
in a folder passed as `task.include_path`. Not supported: groups and tags (run their tasks one by one, e.g. as a
sweep over `task.name`), chat templates, tasks that need model metadata (RULER), lm-eval's stderr.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvbench.cache import ModelSpec
from kvbench.engine import Engine, Measurement
from kvbench.errors import ConfigError, require
from kvbench.method import Method
from kvbench.task import Sample, Task

# lm-eval is an optional dependency (`kvbench[lmeval]`) and takes seconds to import: it loads inside the
# methods, once this task is chosen and its settings passed.
if TYPE_CHECKING:
    from lm_eval.api.task import Task as LmEvalTask

    from kvbench.lmeval import KVBenchLM

LIST_HINT = "list them with `lm-eval ls tasks`"


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str, include_defaults: bool):
    """lm-eval's index of task configs (indexing its own ~14k takes seconds: done once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path or None, include_defaults=include_defaults)


@dataclass
class Document(Sample):
    """One lm-eval document: its requests (lm-eval `Instance`s, which collect the responses)."""

    doc: Any = None
    instances: list[Any] = field(default_factory=list)


@dataclass
class Answered:
    """A document whose requests were answered (the responses sit on its instances), and what it cost."""

    measurement: Measurement


@dataclass
class LmEval(Task):
    """`name`: one lm-eval task. `include_path`: a folder of extra task YAMLs (lm-eval's `--include_path`).
    `include_defaults`: also index lm-eval's own tasks. `num_fewshot`: None keeps the task's own.
    `fewshot_seed`: lm-eval's default seed for drawing few-shot examples. `limit`: documents (0 = all)."""

    name: str = ""
    include_path: str = ""
    include_defaults: bool = True
    num_fewshot: int | None = None
    fewshot_seed: int = 1234

    def __post_init__(self) -> None:
        super().__post_init__()
        require(find_spec("lm_eval") is not None, "task", "lmeval", "usable with lm-eval installed (kvbench[lmeval])")
        require(bool(self.name), "task.name", self.name, f"an lm-eval task name ({LIST_HINT})")
        if self.include_path:
            require(Path(self.include_path).is_dir(), "task.include_path", self.include_path, "a folder of task YAMLs")
        if self.num_fewshot is not None:
            require(self.num_fewshot >= 0, "task.num_fewshot", self.num_fewshot, "an integer >= 0, or null")
        self._task: LmEvalTask | None = None
        self._model: KVBenchLM | None = None
        self._data_sha256: str | None = None

    def check(self, model: ModelSpec, method: Method) -> None:
        task = self.task()  # an unknown name or missing data fails here, before any weights load
        metric = next(iter(task.aggregation()))
        # Read per instance by the runner, which records them: known only once the task is loaded.
        self.primary_metric = f"{metric},{self.filters()[0].name}"
        self.higher_is_better = bool(task.higher_is_better().get(metric, True))

    def describe(self) -> dict[str, Any]:
        # Part of the run's identity: the lm-eval release, the task's config (prompts, metrics, data files) and
        # the evaluated documents themselves, so that an edited task or data file makes a new run.
        import lm_eval

        config = json.dumps(self.task().dump_config(), sort_keys=True, default=_stable_name)
        return {
            **super().describe(),
            "lm_eval_version": lm_eval.__version__,
            "task_version": self.task().VERSION,
            "task_config_sha256": hashlib.sha256(config.encode("utf-8")).hexdigest(),
            "data_sha256": self.data_sha256(),
        }

    # ----- the lm-eval task -----
    def task(self) -> LmEvalTask:
        """The lm-eval task, loaded once (with its data), set up as `lm_eval.simple_evaluate` sets it up."""
        if self._task is None:
            self._task = self._load()
            if self.num_fewshot is not None and self._task.get_config("num_fewshot") != 0:
                self._task.set_config(key="num_fewshot", value=self.num_fewshot)  # lm-eval keeps a task's 0
            elif self._task.get_config("num_fewshot") is None:
                self._task.set_config(key="num_fewshot", value=0)
            self._task.set_fewshot_seed(seed=self.fewshot_seed)
        return self._task

    def _load(self) -> LmEvalTask:
        manager = task_manager(self.include_path, self.include_defaults)
        if self.name not in manager.all_tasks:
            close = difflib.get_close_matches(self.name, manager.all_tasks, n=3)
            where = f" --include_path {self.include_path}" if self.include_path else ""
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError("task.name", self.name, f"an lm-eval task name; {hint}{LIST_HINT}{where}")
        try:
            tasks = manager.load([self.name])["tasks"]
        except (OSError, ValueError) as error:  # data missing or unreachable (offline), a broken task config
            reason = " ".join([f"{type(error).__name__}:", *str(error).splitlines()[:1]])
            raise ConfigError(
                "task.name",
                self.name,
                f"a task whose data loads ({reason}); offline, point a task YAML's dataset_path/data_files at "
                "local files and pass its folder as task.include_path",
            ) from error
        require(
            len(tasks) == 1,
            "task.name",
            self.name,
            f"a single lm-eval task, not a group or tag of {len(tasks)} (run them one by one: {', '.join(tasks)})",
        )
        return next(iter(tasks.values()))

    def filters(self) -> list[Any]:
        """The task's filter pipelines (lm-eval keeps them private; each has a `name` and `apply`)."""
        return self.task()._filters

    def data_sha256(self) -> str:
        if self._data_sha256 is None:
            digest = hashlib.sha256()
            for _, doc in self.task().doc_iterator(limit=self.limit or None):
                digest.update(json.dumps(doc, sort_keys=True, default=str).encode("utf-8"))
            self._data_sha256 = digest.hexdigest()
        return self._data_sha256

    # ----- samples -----
    def samples(self, tokenizer) -> Iterator[Document]:
        task = self.task()
        task.build_all_requests(limit=self.limit or None)
        requests: dict[int, list[Any]] = {}
        for instance in task.instances:
            requests.setdefault(instance.doc_id, []).append(instance)
        for doc_id, doc in task.doc_iterator(limit=self.limit or None):
            instances = sorted(requests[doc_id], key=lambda instance: instance.idx)
            yield Document(str(doc_id), prompt_ids=[], reference=task.doc_to_target(doc), doc=doc, instances=instances)

    def count(self) -> int | None:
        documents = len(self.task().eval_docs)
        return min(documents, self.limit) if self.limit else documents

    def evaluate_batch(self, engine: Engine, samples: list[Document]) -> list[Answered]:
        """Answer every request of these documents, by request type (as lm-eval's evaluator does, each
        request `repeats` times)."""
        from kvbench.lmeval import merged

        model = self.model(engine, batch_size=len(samples))
        by_type: dict[str, list[Any]] = {}
        for sample in samples:
            for instance in sample.instances:
                by_type.setdefault(instance.request_type, []).extend([instance] * instance.repeats)
        costs: dict[int, list[Measurement]] = {}
        for request_type, requests in by_type.items():
            model.measurements.clear()
            responses = getattr(model, request_type)(requests, disable_tqdm=True)
            for instance, response, cost in zip(requests, responses, model.measurements, strict=True):
                instance.resps.append(response)
                costs.setdefault(id(instance), []).append(cost)
        return [Answered(merged([m for i in sample.instances for m in costs[id(i)]])) for sample in samples]

    def model(self, engine: Engine, batch_size: int) -> KVBenchLM:
        """lm-eval's view of the run's engine, made once (on the first, full, batch)."""
        from kvbench.lmeval import KVBenchLM

        if self._model is None or self._model.engine is not engine:
            self._model = KVBenchLM(engine, batch_size=batch_size)
        return self._model

    # ----- scores -----
    def score(self, sample: Document, output: Answered) -> dict[str, Any]:
        """The document's responses and lm-eval's metric values for each filter, keyed `metric,filter`."""
        for pipeline in self.filters():
            pipeline.apply(sample.instances)  # filters map each document's responses on their own
        row: dict[str, Any] = {
            "id": sample.id,
            "target": sample.reference,
            "responses": [instance.resps for instance in sample.instances],
            "filtered_responses": {},
        }
        for key in sample.instances[0].filtered_resps:
            responses = [instance.filtered_resps[key] for instance in sample.instances]
            row["filtered_responses"][key] = responses
            metrics = self.task().process_results(sample.doc, responses)
            row.update({f"{metric},{key}": value for metric, value in metrics.items()})
        return row

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """lm-eval's aggregation of each metric (its default, the mean, where the task names none)."""
        from lm_eval.api.metrics import mean

        aggregation = self.task().aggregation()
        keys = dict.fromkeys(key for row in rows for key in row if "," in key)  # only metric keys have commas
        return {
            key: float(aggregation.get(key.split(",")[0], mean)([row[key] for row in rows if key in row]))
            for key in keys
        }


def _stable_name(value: Any) -> str:
    """Functions in a task config (`!function` hooks) as their names, not their memory addresses."""
    return getattr(value, "__qualname__", type(value).__qualname__)
