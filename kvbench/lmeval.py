"""kvbench as an lm-evaluation-harness model: any lm-eval task under any KV-cache method.

`KVBenchLM` is lm-eval's own `hf` model (`HFLM`: its tokenization, left truncation to `max_length`, rolling
windows, stop strings, chat templates) with every request answered by kvbench's engine, the method's cache in
effect:

- `loglikelihood`: the context is prefilled (in `kvbench.prefill_chunk` chunks) and compressed by the method;
  then each continuation token is predicted and fed through the decode path one at a time (the WikiText-2
  stream protocol, `Engine.score_continuation`), so evicted or quantized tokens shape every prediction.
- `loglikelihood_rolling`: lm-eval's rolling windows of `max_length` tokens, each scored as above (a window's
  context, the tokens before it, is prefilled and compressed; its new tokens are decoded).
- `generate_until`: the engine's generation, `batch_size` requests decoded together (grouped and ordered as
  `hf` groups them). Stop strings cut the decoded text afterwards as in `hf`; a stop string that is a single
  token also ends decoding early, which leaves the text unchanged.

With `method=full` the scores equal `hf`'s on the same weights (tests/test_lmeval.py). Every answered
request leaves one `Measurement` in `KVBenchLM.measurements`; lm-eval's results carry their summary
(`kvbench` in the results' config), and `task=lmeval` (tasks/lmeval.py) turns them into kvbench records.

Use: `python -m kvbench.lmeval --model kvbench --model_args model=smollm2-135m,method=snapkv,method.budget=512
--tasks <task>` (lm-eval's command line; `--model_args` are kvbench config overrides); from Python,
`lm_eval.simple_evaluate(model="kvbench", model_args=...)` once this module is imported, or
`simple_evaluate(model=KVBenchLM(engine))`. The distribution declares an `lm_eval.models` entry point, which
lm-eval versions that discover plugins (EleutherAI/lm-evaluation-harness PR #4013) use for `lm_eval --model
kvbench`; lm-eval 0.4.13, the newest release, does not look for them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from kvbench.engine import Engine, Measurement, Request, Sampling
from kvbench.errors import ConfigError, report, require

MODEL_NAME = "kvbench"
# `--model_args` keys that are HFLM's own (how lm-eval cuts and prefixes requests); every other key is a
# kvbench config override (model=..., method=..., model.*, method.*, kvbench.*).
HF_OPTIONS = ("max_length", "add_bos_token", "prefix_token_id")
CONFIG_GROUPS = ("model", "method", "kvbench")


def merged(measurements: Sequence[Measurement]) -> Measurement:
    """One measurement for work done as several requests (a document's choices, a text's rolling windows).

    Times, steps and tokens add up; bytes are the largest request's (its cache is the one the work needed);
    each request keeps its decode batch size, so run-level means still count a batch's time once.
    """
    first = measurements[0]
    stats: dict[str, float] = {}
    for m in measurements:
        for key, value in m.method_stats.items():
            stats[key] = stats.get(key, 0) + value
    return Measurement(
        prompt_tokens=max(m.prompt_tokens for m in measurements),
        prefill_s=sum(m.prefill_s for m in measurements),
        prefill_shared=all(m.prefill_shared for m in measurements),  # no request of the work was prefilled
        decode_steps=sum(m.decode_steps for m in measurements),
        decode_s=sum(m.decode_s for m in measurements),
        decode_tokens=sum(m.decode_tokens for m in measurements),
        batch_size=first.batch_size,
        engine=first.engine,
        compile_s=sum(m.compile_s for m in measurements),
        kv_bytes_device=max(m.kv_bytes_device for m in measurements),
        kv_bytes_device_peak=max(m.kv_bytes_device_peak for m in measurements),
        kv_bytes_host=max(m.kv_bytes_host for m in measurements),
        dense_kv_bytes=max(m.dense_kv_bytes for m in measurements),
        peak_memory_bytes=max(m.peak_memory_bytes for m in measurements),
        method_stats=stats,
    )


class KVBenchLM(HFLM):
    """lm-eval's `hf` model answering through a kvbench `Engine` (its model, tokenizer and method).

    `batch_size`: generation requests decoded together. `max_length`, `add_bos_token`, `prefix_token_id`: as
    for `hf` (by default the model's positions, the tokenizer's own special tokens, BOS else EOS).
    """

    def __init__(
        self,
        engine: Engine,
        batch_size: int = 1,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
    ) -> None:
        _check_batch_size(batch_size)
        super().__init__(
            pretrained=engine.model,
            tokenizer=engine.tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            add_bos_token=add_bos_token,
            prefix_token_id=prefix_token_id,
        )
        self.engine = engine
        self.measurements: list[Measurement] = []  # one per request answered, in request order
        self._sampling_calls = 0  # seeds successive sampled batches differently, reproducibly

    # ----- building from lm-eval's --model_args -----
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> KVBenchLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> KVBenchLM:
        """`arg_dict`: kvbench config overrides plus `HF_OPTIONS`; `additional_config`: lm-eval's
        `batch_size`. Its `device` is ignored: lm-eval's command line passes `cuda:0` whether or not `--device`
        was given, so the device is kvbench's `model.device` (`auto` by default: CUDA where there is one)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        overrides, hf_options = [], {}
        for key, value in arg_dict.items():
            if key in HF_OPTIONS:
                hf_options[key] = value
                continue
            require(
                key.split(".")[0] in CONFIG_GROUPS,
                f"model_args {key}",
                value,
                f"a kvbench config override ({', '.join(g + '=... / ' + g + '.*' for g in CONFIG_GROUPS)}) "
                f"or one of {', '.join(HF_OPTIONS)}",
            )
            overrides.append(f"{key}={_hydra_value(value)}")
        batch_size = extra.get("batch_size", 1)
        batch_size = int(batch_size) if str(batch_size).isdigit() else batch_size
        _check_batch_size(batch_size)  # before the model loads
        return cls(engine_from_overrides(overrides), batch_size=batch_size, **hf_options)

    # ----- lm-eval's three request types -----
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each continuation after its context, through the method's cache."""
        answers = []
        for request, context, continuation in tqdm(requests, disable=disable_tqdm, desc="kvbench loglikelihood"):
            logprob, greedy, measurement = self._score(context, continuation)
            answers.append((logprob, greedy))
            self.measurements.append(measurement)
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answers[-1])
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: lm-eval's disjoint rolling windows (as `hf` cuts them, the
        first conditioned on the prefix token), each scored through the method's cache."""
        totals = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="kvbench loglikelihood_rolling"):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            scored = [self._score(*make_disjoint_window(window)) for window in windows]
            totals.append(sum(logprob for logprob, _, _ in scored))
            self.measurements.append(merged([m for _, _, m in scored]))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generations cut at their stop strings; `batch_size` requests with the same settings decode together
        (longest first, as `hf` batches them)."""
        collator = Collator(
            [r.args for r in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        answers: list[tuple[str, Measurement]] = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="kvbench generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, settings = zip(*chunk, strict=True)
            answers += self._generate(list(contexts), settings[0])
            progress.update(len(chunk))
        progress.close()
        answers = collator.get_original(answers)
        for (context, settings), (text, _) in zip([r.args for r in requests], answers, strict=True):
            self.cache_hook.add_partial("generate_until", (context, settings), text)
        self.measurements += [m for _, m in answers]
        return [text for text, _ in answers]

    # ----- the work -----
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool, Measurement]:
        """(log-probability, whether every token is the argmax, measurement) of `continuation` after
        `context`, both cut together to the last `max_length + 1` tokens as `hf` cuts them."""
        if len(continuation) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length={self.max_length}")
        window = (context + continuation)[-(self.max_length + 1) :]
        prefix = window[: len(window) - len(continuation)]
        with PredictedTokens(self.engine.model) as predicted:
            scored = self.engine.score_continuation(prefix, continuation)
        return -scored.nll_sum, predicted.last(len(continuation)) == continuation, scored.measurement

    def _generate(self, contexts: list[str], settings: dict[str, Any]) -> list[tuple[str, Measurement]]:
        """One decode batch: the contexts' generations (cut at the stop strings) and their measurements."""
        options = dict(normalize_gen_kwargs(settings, self.max_gen_toks))
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(options.pop("until", None), eos=eos)
        max_new_tokens = options.pop("max_gen_toks")
        require(
            max_new_tokens < self.max_length,
            "max_gen_toks",
            max_new_tokens,
            f"fewer than max_length={self.max_length} (room is left for the context)",
        )
        sampling = self._sampling(options)
        stop_ids = {self.eot_token_id}
        for stop in until:
            ids = self.tok_encode(stop, add_special_tokens=False)
            if len(ids) == 1:
                stop_ids.add(ids[0])
        prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_new_tokens) for c in contexts]
        batch = [Request(p, max_new_tokens, stop_ids=sorted(stop_ids), sampling=sampling) for p in prompts]
        generations = self.engine.generate_batch(batch)
        return [(postprocess_generated_text(g.text, until, None), g.measurement) for g in generations]

    def _sampling(self, options: dict[str, Any]) -> Sampling | None:
        """Greedy unless lm-eval asks for sampling; kvbench samples with temperature and top-p only."""
        if not options.pop("do_sample", False) or float(options.get("temperature", 0.0)) <= 0.0:
            return None
        temperature, top_p = float(options.pop("temperature")), float(options.pop("top_p", 1.0))
        require(not options, "gen_kwargs", options, "do_sample, temperature, top_p, until, max_gen_toks only")
        self._sampling_calls += 1
        return Sampling(temperature=temperature, top_p=top_p, seed=self._sampling_calls)

    def get_model_info(self) -> dict:
        """`hf`'s model information plus the kvbench method and what its caches measured."""
        from kvbench.run import summarize

        info = super().get_model_info()
        method = self.engine.method
        info["kvbench"] = {
            "method": type(method).__name__,
            "method_params": method.describe(),
            "engine": self.engine.engine,
            "prefill_chunk": self.engine.prefill_chunk,
            "measurements": summarize(self.measurements, self.engine.device),
        }
        return info


class PredictedTokens:
    """The token each forward of `model` predicts at its last position, collected by a forward hook on the
    output layer while in a `with` block. `Engine.score_continuation` predicts continuation token i in the
    i-th of its last forwards, so this gives lm-eval's greedy check without a second pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layer = model.get_output_embeddings()
        self.argmaxes: list[torch.Tensor] = []

    def __enter__(self) -> PredictedTokens:
        self.handle = self.layer.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _record(self, module: torch.nn.Module, inputs: Any, logits: torch.Tensor) -> None:
        self.argmaxes.append(logits[0, -1].argmax())  # stays on the device: no sync per step

    def last(self, count: int) -> list[int]:
        return torch.stack(self.argmaxes[-count:]).tolist()


def _check_batch_size(batch_size: Any) -> None:
    require(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "an integer >= 1 (no auto)")


def _hydra_value(value: Any) -> str:
    """An lm-eval-parsed `--model_args` value (bool, None, number or string) as a Hydra override value."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def engine_from_overrides(overrides: list[str]) -> Engine:
    """A kvbench engine from config overrides (`model=...`, `method=...`, `method.budget=...`): composed
    and checked as `python -m kvbench` checks them, before any weights load."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from kvbench.__main__ import CONFIG_DIR
    from kvbench.config import build
    from kvbench.models import load_model, model_spec

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        try:
            composed = compose(config_name="config", overrides=overrides)
        except HydraException as error:  # a misspelled key or an unknown method: one line, as the CLI says it
            raise ConfigError("model_args", ",".join(overrides), " ".join(str(error).split())) from None
        config = build(composed)
    spec = model_spec(config.model)
    config.method.check(spec)
    model, tokenizer = load_model(config.model)
    return Engine.for_run(model, tokenizer, config.method, spec, config.settings)


def main() -> None:
    """`python -m kvbench.lmeval <lm-eval arguments>`: lm-eval's command line, with `--model kvbench`."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except ConfigError as error:
        report(error)
        sys.exit(2)


# Registered by import path, as lm-eval registers its own models (which importing `lm_eval.models.huggingface`
# registered first; lm-eval's registry fills itself only while empty): one entry whether this module is
# imported or runs as `python -m kvbench.lmeval` (as `__main__`, a second copy of the class), and none over
# an entry point placeholder that a plugin-discovering lm-eval registered first.
if MODEL_NAME not in model_registry:
    model_registry.register(MODEL_NAME, target="kvbench.lmeval:KVBenchLM")

if __name__ == "__main__":
    main()
