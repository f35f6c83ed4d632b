"""The engine: chunked prefill one sequence at a time, then batched decode with the method's cache.

Three paths with the same results. `eager` runs the decode step as plain PyTorch (CPU, debugging, any
method). `compiled` runs the same step through `torch.compile(fullgraph=True)` and, on CUDA, captures it
once in a CUDA graph and replays it: the step has fixed shapes and no host syncs (token choice, stop checks
and positions all stay on the device), so the replay launches no Python. What is compiled is
`compile_scope`: `layer` (the default) compiles a decoder layer's forward, which every layer reuses (one
Inductor compile, then graph-cache hits: layers differ only in weights and cache tensors, which are inputs)
and the final norm and token choice apart, and runs the rest of the step (embedding, LM head) eagerly
inside the same CUDA graph; `step` compiles the whole step as one graph (fusions across layer boundaries,
at a compile time that grows with the layer count). `graph` captures the eager step without compiling it
(no compile time; unfused kernels). The host looks at the stop flags only every `STOP_CHECK_EVERY` steps.
On a GPU both fast paths fuse the projections that share an input (`kvbench.fused_projections`: one product
for q/k/v and one for gate/up, as gpt-fast stores them).

Sequences of different lengths decode together: each is prefilled on its own (exact positions, no
padding), then their caches are stacked into one batch whose slot buffers have the same size (empty slots
are masked); identical requests are prefilled once, and stacking copies that cache for each. Timing uses
CUDA events on a GPU (host clock elsewhere); compilation, capture and warm-up steps are timed apart from
decode.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch._inductor.config

from kvbench.attention import CACHE_KWARG
from kvbench.cache import KVCache, ModelSpec, aligned_slots
from kvbench.fused_projections import fuse_projections
from kvbench.method import Method
from kvbench.models import rope_inv_freq

ENGINES = ("eager", "graph", "compiled")
COMPILE_SCOPES = ("layer", "step")
STOP_CHECK_EVERY = 16  # decode steps between looks at the stop flags (each look is one host sync)
WARMUP_STEPS = 2  # compiled steps run (and kept) before the CUDA graph is captured
# `first_argmax` splits each row's scores into this many chunks: B x 128 rows in the first pass fill an H100's
# 132 SMs about once at batch 1, and Llama-3's 128,256 tokens are 128 chunks of 1,002 (no padding).
ARGMAX_CHUNKS = 128


def first_argmax(scores: torch.Tensor, chunks: int = ARGMAX_CHUNKS) -> torch.Tensor:
    """`scores.argmax(-1)` of [B, V] scores (the first maximum), in two passes: each of `chunks` slices of a
    row gives its maximum and that maximum's first index, then the first slice holding the row's maximum
    gives the token. Why: one pass reduces each row in one thread block, and a 128k vocabulary then took
    27-28 us of a decode step (ATen's ArgMax kernel, layer scope) or 37 us (Inductor's, step scope) on the
    H200 (`benchmarks/results/profile_step_h200.jsonl`), about a tenth of the LM head's own time; the first
    pass here spreads over B x chunks rows. Exact: no arithmetic on the scores, only comparisons."""
    b, v = scores.shape
    chunks = min(chunks, v)
    width = -(-v // chunks)
    # Padding is -inf at the end: a padded slot never beats a real one, and ties go to the earlier index.
    padded = torch.nn.functional.pad(scores, (0, width * chunks - v), value=float("-inf"))
    best, index = padded.view(b, chunks, width).max(dim=-1)  # torch.max: the first index of a maximum
    chunk = best.argmax(dim=-1, keepdim=True)
    return (chunk * width + index.gather(-1, chunk)).view(b)


def _on_layer(forward: Callable, layer_idx: int) -> Callable:
    """A decoder layer's compiled forward, run with its cache layer set as the cache's `active` one."""

    def run(*args, **kwargs):
        cache = kwargs.get(CACHE_KWARG)
        if cache is None:
            return forward(*args, **kwargs)
        cache.activate(layer_idx)
        try:
            return forward(*args, **kwargs)
        finally:
            cache.activate(None)

    return run


@dataclass
class Measurement:
    """What one sample cost: time, and bytes counted from the cache's tensors."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    # Prefilled once with an identical request (prompt and question) earlier in its batch, whose cache the
    # batch copies: this sample's prefill_s is 0 (the copy is part of stacking the batch).
    prefill_shared: bool = False
    decode_steps: int = 0  # timed decode steps (batched: steps of the whole batch)
    decode_s: float = 0.0
    decode_tokens: int = 0  # tokens this sample generated in the timed steps
    batch_size: int = 1
    engine: str = "eager"
    compile_s: float = 0.0  # compilation, graph capture and warm-up steps, not in decode_s
    kv_bytes_device: int = 0  # after the sample, what the cache holds where attention runs (per sequence)
    kv_bytes_device_peak: int = 0  # the most it held (prefill holds the whole prompt)
    kv_bytes_host: int = 0
    dense_kv_bytes: int = 0  # a dense cache preallocated for the same prompt and decode tokens
    peak_memory_bytes: int = 0
    method_stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Sampling:
    """Temperature / nucleus sampling, seeded so runs repeat exactly."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Request:
    """One generation. `question_ids` follow the prompt through the decode path one token at a time (the
    two-phase protocol: the question meets an already-compressed context); stop tokens cannot be produced
    before `min_new_tokens`."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    question_ids: Sequence[int] = ()
    stop_ids: Sequence[int] = ()
    sampling: Sampling | None = None
    min_new_tokens: int = 0


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    measurement: Measurement
    stopped: bool = False  # ended on a stop token (the task's or the model's own), not at the token limit


@dataclass
class Scored:
    """Negative log-likelihood of continuation tokens predicted through the method's cache."""

    nll_sum: float
    tokens: int
    measurement: Measurement | None  # None: scored without the engine's cache (WikiText-2's sliding windows)


@dataclass
class DecodeState:
    """Everything a batched decode step reads and writes, as fixed device tensors changed in place."""

    tokens: torch.Tensor  # [B] the token each sequence feeds next
    positions: torch.Tensor  # [B] its position
    count: torch.Tensor  # [B] tokens generated so far
    done: torch.Tensor  # [B] stopped, or at its token limit
    output: torch.Tensor  # [B, max_new + 1] generated tokens; finished sequences write the last column
    stop_mask: torch.Tensor  # [B, vocab] tokens that end each sequence
    min_new: torch.Tensor  # [B]
    max_new: torch.Tensor  # [B]
    temperature: float | None  # None: greedy
    top_p: float


class Timer:
    """Elapsed seconds of a region: CUDA events on a GPU (no host wait inside), the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin_s = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.elapsed_s = time.perf_counter() - self.begin_s

    @property
    def seconds(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1000
        return self.elapsed_s


def check_inductor_options(options: dict, engine: str) -> dict:
    """`options` (Inductor config key -> value) if every key is one of `torch._inductor.config`'s with a value
    of its type, for `engine=compiled`; else a ValueError naming the first bad key."""
    if options and engine != "compiled":
        raise ValueError(f"inductor_options: only for engine=compiled, got engine={engine!r}")
    known = torch._inductor.config.get_config_copy()
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"inductor_options: {key!r} is not an Inductor config key (torch._inductor.config)")
        default = known[key]
        if default is not None and type(value) is not type(default):
            kind = type(default).__name__
            raise ValueError(f"inductor_options: {key}={value!r} must be a {kind} (default {default!r})")
    return dict(options)


def parse_inductor_options(pairs: Sequence[str]) -> dict:
    """KEY=VALUE strings (a command line's) as Inductor options, each value read as its key's type (booleans
    as 1/0 or true/false). A bad key or value raises a ValueError naming it."""
    known = torch._inductor.config.get_config_copy()
    options = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if key not in known or not text:
            raise ValueError(f"inductor option {pair!r}: KEY=VALUE with KEY an Inductor config key")
        default = known[key]
        if isinstance(default, bool):
            options[key] = text.lower() in ("1", "true")
        elif isinstance(default, int | float):
            options[key] = type(default)(text)
        else:
            options[key] = text
    return options


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        method: Method,
        spec: ModelSpec,
        prefill_chunk: int = 512,
        engine: str = "eager",
        fuse: bool = True,
        compile_scope: str = "layer",
        inductor_options: dict | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: one of {ENGINES}")
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope={compile_scope!r}: one of {COMPILE_SCOPES}")
        # Inductor config values for the compiled step (experiments, e.g. combo_kernels): checked here, before
        # any compile, against Inductor's own keys and types.
        self.inductor_options = check_inductor_options(inductor_options or {}, engine)
        self.compile_scope = compile_scope
        self.model, self.tokenizer, self.method, self.spec = model, tokenizer, method, spec
        self.prefill_chunk = prefill_chunk
        self.engine = engine
        if engine != "eager" and fuse and next(model.parameters()).is_cuda:
            # The fast paths on a GPU read each layer's q/k/v (and gate/up) weights in one product; in place
            # and idempotent, so a model kept for the next run of a sweep stays fused (same math, same
            # memory; not always the same rounding: a fused product may take another cuBLAS kernel, and in bf16
            # with random weights a greedy token may then differ from the unfused eager step's). Not on
            # a CPU, where it buys nothing and a fused model ignores weights replaced later (a test that
            # folds a rotation into a shared model's weights would silently see the old ones).
            fuse_projections(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.inv_freq = rope_inv_freq(model)
        # transformers renamed `past_key_values` to `cache` (5.2x) and dropped `cache_position`; accept both.
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.takes_cache_position = "cache_position" in params
        # Chat models may end a turn with several tokens (e.g. Llama-3.1's 128001/128008/128009).
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.model_stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._compiled_step: Callable[[KVCache, DecodeState], None] | None = None
        # compile_scope="layer": each decoder layer's compiled forward (and the final norm's), and the token choice
        self._compiled_layers: list[Callable] = []
        self._compiled_choose: Callable[[torch.Tensor, DecodeState], None] | None = None
        self.compile_options: dict = {}  # extra `torch.compile` arguments (tests trace with backend="eager")

    @classmethod
    def for_run(cls, model: torch.nn.Module, tokenizer, method: Method, spec: ModelSpec, settings) -> Engine:
        """The engine a run's `kvbench:` settings (`kvbench.config.RunSettings`) ask for."""
        return cls(
            model,
            tokenizer,
            method,
            spec,
            settings.prefill_chunk,
            settings.engine,
            compile_scope=settings.compile_scope,
            inductor_options=settings.inductor_options,
        )

    # ----- building blocks -----
    def new_cache(self, prompt_len: int, decode_len: int) -> KVCache:
        # A model with its own cache layout (the Block Transformer's) builds it; the method is its to check.
        own_cache = getattr(self.model, "make_kvbench_cache", None)
        if own_cache is not None:
            return own_cache(self.method, prompt_len, decode_len)
        return self.method.make_cache(self.spec, prompt_len, decode_len, 1, self.inv_freq)

    def _logits(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, all_logits: bool = False):
        """Forward `tokens` [B, T] at `positions` [B, T] through `cache`; logits [B, T or 1, vocab]."""
        extra = {"cache_position": positions[0]} if self.takes_cache_position else {}
        out = self.model(
            input_ids=tokens,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **{self.cache_kwarg: cache, CACHE_KWARG: cache},
            **extra,
        )
        return out.logits

    def _forward(self, cache: KVCache, ids: Sequence[int], start: int, all_logits: bool = False) -> torch.Tensor:
        """One sequence's tokens `ids` from position `start`; logits [len or 1, vocab]."""
        tokens = torch.tensor([list(ids)], device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        return self._logits(cache, tokens, positions, all_logits)[0]

    def _prefill(self, cache: KVCache, prompt: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        logits = []
        for start in range(0, len(prompt), self.prefill_chunk):
            chunk = prompt[start : start + self.prefill_chunk]
            logits.append(self._forward(cache, chunk, start, all_logits))
        return torch.cat(logits)

    def _dense_bytes(self, tokens: int) -> int:
        """What the dense cache allocates for `tokens` tokens (its slots are aligned like every layer's)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        per_token = 2 * self.spec.num_layers * self.spec.num_kv_heads * self.spec.head_dim * element
        return per_token * aligned_slots(tokens)

    def _peak_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS; Linux says KiB

    def _prefill_one(
        self, request: Request, prompt_len: int, decode_len: int, m: Measurement
    ) -> tuple[KVCache, torch.Tensor]:
        """Prefill one sequence (then its question, through the decode path) in a cache sized for the batch."""
        cache = self.new_cache(prompt_len, decode_len)
        with Timer(self.device) as timer:
            logits = self._prefill(cache, request.prompt_ids)[-1]
            m.kv_bytes_device_peak = cache.kv_bytes()[0]
            cache.finish_prefill()
            position = len(request.prompt_ids)
            for token in request.question_ids:
                logits = self._forward(cache, [token], position)[-1]
                position += 1
        m.prefill_s = timer.seconds
        m.prompt_tokens = len(request.prompt_ids) + len(request.question_ids)
        return cache, logits

    @staticmethod
    def _prefill_key(request: Request) -> tuple:
        """What a prefill depends on: requests with equal keys in one batch share one prefill."""
        return tuple(request.prompt_ids), tuple(request.question_ids)

    # ----- the decode step -----
    def _step(self, cache: KVCache, state: DecodeState) -> None:
        """Feed each sequence's next token, choose the one after it, advance. Device work only."""
        logits = self._logits(cache, state.tokens.view(-1, 1), state.positions.view(-1, 1))[:, -1]
        state.positions.add_(1)
        self._choose(logits, state)

    @staticmethod
    def _choose(logits: torch.Tensor, state: DecodeState) -> None:
        """Pick each sequence's next token from `logits` [B, vocab] and record it, on the device."""
        blocked = state.stop_mask & (state.count < state.min_new).view(-1, 1)
        logits = logits.float().masked_fill(blocked, float("-inf"))
        if state.temperature is None:
            token = first_argmax(logits)
        else:
            probs = torch.softmax(logits / state.temperature, dim=-1)
            if state.top_p < 1.0:
                ordered, order = probs.sort(dim=-1, descending=True)
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                outside = ordered.cumsum(-1) - ordered >= state.top_p
                probs = torch.zeros_like(probs).scatter_(-1, order, ordered.masked_fill(outside, 0.0))
            # Gumbel-max: argmax(log p + G) draws from p, with no host sync and static shapes.
            gumbel = -torch.log(-torch.log(torch.rand_like(probs).clamp_(min=1e-20)))
            token = first_argmax(probs.log() + gumbel)
        column = torch.where(state.done, state.output.shape[1] - 1, state.count)
        state.output.scatter_(1, column.view(-1, 1), token.view(-1, 1))
        state.count.add_((~state.done).long())
        stopped = state.stop_mask.gather(1, token.view(-1, 1)).view(-1)
        state.done.logical_or_(stopped | (state.count >= state.max_new))
        state.tokens.copy_(token)

    def _decode_state(self, requests: Sequence[Request], positions: list[int]) -> DecodeState:
        b, device = len(requests), self.device
        vocab = self.model.get_output_embeddings().weight.shape[0]
        stop_mask = torch.zeros(b, vocab, dtype=torch.bool, device=device)
        for row, request in enumerate(requests):
            stops = sorted((set(request.stop_ids) | self.model_stop_ids) & set(range(vocab)))
            stop_mask[row, stops] = True
        sampling = requests[0].sampling
        if len({(s.temperature, s.top_p) if s else None for s in (r.sampling for r in requests)}) > 1:
            raise ValueError("one batch decodes with one sampling setting")

        def per_row(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        max_new = max(r.max_new_tokens for r in requests)
        return DecodeState(
            tokens=torch.zeros(b, dtype=torch.long, device=device),
            positions=per_row(positions),
            count=torch.zeros(b, dtype=torch.long, device=device),
            done=torch.zeros(b, dtype=torch.bool, device=device),
            output=torch.zeros(b, max_new + 1, dtype=torch.long, device=device),
            stop_mask=stop_mask,
            min_new=per_row([r.min_new_tokens for r in requests]),
            max_new=per_row([r.max_new_tokens for r in requests]),
            temperature=sampling.temperature if sampling else None,
            top_p=sampling.top_p if sampling else 1.0,
        )

    def _step_runner(
        self, cache: KVCache, state: DecodeState, steps_left: int
    ) -> tuple[Callable[[], None], float, int]:
        """The step to repeat, the seconds spent making it (compile, capture, warm-up steps), and how many
        real steps that already ran (their tokens count; their time is not decode time; at most `steps_left`).

        A cache whose step takes one of a few versions chosen on the host (`decode_variants`: the Block
        Transformer runs its block decoder every L_B-th step; a quantized window flushes once every block of
        steps) names them; each version is compiled by a warm-up step, captured once on CUDA, and each step
        after that picks its version from the host's counters, which the engine moves after a step that ran
        no Python (`cache.advance()`)."""
        if self.engine == "eager" or (self.engine == "graph" and self.device.type != "cuda"):
            return (lambda: self._step(cache, state)), 0.0, 0  # a step run as Python schedules itself
        unsafe = [type(layer).__name__ for layer in cache.layers if not layer.graph_safe]
        if self.device.type == "cuda" and unsafe:
            raise ValueError(f"kvbench.engine={self.engine}: {unsafe[0]} cannot run in a CUDA graph yet; use eager")
        if self.engine == "graph":  # the eager step, captured: no compilation, launches still unfused
            compiled = self._step
        elif self.compile_scope == "layer":
            compiled = self._step  # its decoder layers run compiled (`_layers_compiled`), the rest as Python
        else:
            if self._compiled_step is None:
                self._reset_dynamo()
                options = {"fullgraph": True, "dynamic": False, **self._compile_kwargs()}
                self._compiled_step = torch.compile(self._step, **options)
            compiled = self._compiled_step
        variants = cache.decode_variants() if hasattr(cache, "decode_variants") else None
        runs_python = self.engine == "graph"  # the eager step moves the host counters itself

        def step() -> None:
            compiled(cache, state)
            if variants is not None and not runs_python:
                cache.advance()

        began = time.perf_counter()
        cuda = self.device.type == "cuda"
        if variants is None and not cuda:
            step()  # the first call compiles
            return step, time.perf_counter() - began, 1
        # Warm-up steps compile every version (on a side stream on CUDA): each takes a version not yet run if
        # one is safe now (a quantized window's flush is exact on any step), else its own.
        pending = set(variants or ())
        # A version not met within one period of the schedule never will be (in a batch with a row due on
        # every step, "no flush" is never safe): the warm-up stops waiting, and replays take a larger one.
        period = cache.variant_period() if hasattr(cache, "variant_period") else len(variants or ())
        warmup = 0
        side = torch.cuda.Stream(self.device) if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            while warmup < steps_left and ((pending and warmup < period) or (cuda and warmup < WARMUP_STEPS)):
                if pending:
                    safe = cache.safe_variants() if hasattr(cache, "safe_variants") else [cache.decode_variant()]
                    variant = next((v for v in safe if v in pending), safe[0])
                    if variant != safe[0]:
                        cache.select_variant(variant)
                    pending.discard(variant)
                step()
                warmup += 1
        if not cuda:
            return step, time.perf_counter() - began, warmup
        torch.cuda.current_stream(self.device).wait_stream(side)
        # Capture records the kernels without running them; each replay runs a whole step with no Python.
        if variants is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                compiled(cache, state)
            torch.cuda.synchronize(self.device)
            return graph.replay, time.perf_counter() - began, warmup
        graphs = {}
        for variant in set(variants) - pending:  # a version never warmed up has no step left to run
            graphs[variant] = torch.cuda.CUDAGraph()
            with cache.hold_variant(variant), torch.cuda.graph(graphs[variant]):
                compiled(cache, state)
        torch.cuda.synchronize(self.device)

        def replay() -> None:
            variant = cache.decode_variant()
            if variant not in graphs:  # never safe during the warm-up: a larger version is exact too
                variant = next(v for v in cache.safe_variants() if v in graphs)
                cache.select_variant(variant)
            graphs[variant].replay()
            cache.advance()  # a replay runs no Python: the host's counters move here

        return replay, time.perf_counter() - began, warmup

    def _reset_dynamo(self) -> None:
        """Dynamo keeps compiled code per code object, and every Engine's `_step` (or decoder layer class's
        `forward`) shares one: without a reset, a sweep's 9th compiled run in one process hit the recompile
        limit (8) and fullgraph raised. A new engine starts from empty caches (Inductor's on-disk cache
        stays). Within an engine, one compile per cache size (and step variant, and kind of layer) is by design, so
        the limits allow as many as the model's positions can make."""
        torch._dynamo.reset()
        limits = torch._dynamo.config
        limits.recompile_limit = max(limits.recompile_limit, self.spec.max_positions)
        limits.accumulated_recompile_limit = max(limits.accumulated_recompile_limit, self.spec.max_positions)

    def _decoder_layers(self) -> list[torch.nn.Module]:
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise ValueError(f"compile_scope=layer: {type(self.model).__name__} has no decoder layers; use step")
        return list(layers)

    @contextlib.contextmanager
    def _layers_compiled(self) -> Iterator[None]:
        """While decode steps run (and are captured), each decoder layer's forward is its compiled version;
        prefill stays eager (its chunks change shape). Only for `engine=compiled` with `compile_scope=layer`.

        One `torch.compile` per layer, all of one code object, and one trace for every layer alike: each
        layer's forward runs with its cache layer set as the cache's `active` one (`_on_layer`), which the
        cache's update and the attention function take instead of indexing the cache by the layer's index
        (dynamo guards on an index it reads: it traced each of the 32 layers apart, and each step version
        again, before 2026-12-05; on CPU, the tiny model's 4 layers, ZipCache compiled in 6.8 s against 31.3
        and KIVI-4 in 5.3 against 21.1). Layers of another kind (ArkVale's exempt ones, CLA's consumers) get
        their own trace. (32 layers of QuaRot had taken 209 s as one graph.)
        The decoder's final norm and the token choice (`_choose`) are compiled too: run eagerly they were
        ~10 small kernels a step (the float copy of the logits, the stop mask, the state updates)."""
        if self.engine != "compiled" or self.compile_scope != "layer":
            yield
            return
        modules = self._decoder_layers()
        decoder_layers = len(modules)
        norm = getattr(self.model.get_decoder(), "norm", None)
        modules += [norm] if isinstance(norm, torch.nn.Module) else []
        if not self._compiled_layers:
            self._reset_dynamo()
            options = {"fullgraph": True, "dynamic": False, **self._compile_kwargs()}
            self._compiled_layers = [torch.compile(module.forward, **options) for module in modules]
            self._compiled_choose = torch.compile(Engine._choose, **options)
        for idx, (module, forward) in enumerate(zip(modules, self._compiled_layers, strict=True)):
            # an instance attribute: nn.Module.__call__ finds it before the class's
            module.forward = _on_layer(forward, idx) if idx < decoder_layers else forward
        self._choose = self._compiled_choose  # the instance's, before the class's static method
        try:
            yield
        finally:
            for module in modules:
                del module.forward
            del self._choose

    # ----- what tasks ask for -----
    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        question_ids: Sequence[int] = (),
        stop_ids: Sequence[int] = (),
        sampling: Sampling | None = None,
        min_new_tokens: int = 0,
    ) -> Generation:
        """Greedy generation, or sampled with `sampling`, of one sequence (see `generate_batch`)."""
        request = Request(prompt_ids, max_new_tokens, question_ids, stop_ids, sampling, min_new_tokens)
        return self.generate_batch([request])[0]

    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[Request]) -> list[Generation]:
        """Generate for every request in one decode batch; one `Generation` per request, in order."""
        prompt_len = max(len(r.prompt_ids) for r in requests)
        decode_len = max(len(r.question_ids) + r.max_new_tokens for r in requests)
        # What ran, which `engine=graph` on CPU is not: there is no graph to capture, the step runs eagerly.
        ran = "eager" if self.engine == "graph" and self.device.type != "cuda" else self.engine
        measurements = [
            Measurement(
                batch_size=len(requests),
                engine=ran,
                dense_kv_bytes=self._dense_bytes(len(r.prompt_ids) + len(r.question_ids) + r.max_new_tokens),
            )
            for r in requests
        ]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        caches, logits = [], []
        prefilled: dict[tuple, tuple[KVCache, torch.Tensor, Measurement]] = {}
        for request, m in zip(requests, measurements, strict=True):
            # Identical requests (n samples of one prompt; a speed benchmark's batch) are prefilled once:
            # prefill is deterministic, and stacking copies each sequence's tensors, so the copies are
            # independent caches, exactly what separate prefills would have built.
            key = self._prefill_key(request)
            if key in prefilled:
                cache, last, first = prefilled[key]
                m.prompt_tokens, m.kv_bytes_device_peak = first.prompt_tokens, first.kv_bytes_device_peak
                m.prefill_shared = True
            else:
                cache, last = self._prefill_one(request, prompt_len, decode_len, m)
                prefilled[key] = cache, last, m
            caches.append(cache)
            logits.append(last)
        cache = type(caches[0]).stack(caches)
        del caches
        state = self._decode_state(requests, [len(r.prompt_ids) + len(r.question_ids) for r in requests])
        seed = requests[0].sampling.seed if requests[0].sampling else 0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            self._choose(torch.stack(logits), state)
            steps, decode_s, compile_s, before = self._decode(cache, state)
        counts = state.count.tolist()
        output = state.output.tolist()
        device_bytes, host_bytes = cache.kv_bytes()
        stats = cache.stats()
        generations = []
        for row, m in enumerate(measurements):
            tokens = output[row][: counts[row]]
            stopped = bool(tokens) and bool(state.stop_mask[row, tokens[-1]])
            m.decode_steps, m.decode_s, m.compile_s = steps, decode_s, compile_s
            m.decode_tokens = max(0, counts[row] - before[row])
            m.kv_bytes_device, m.kv_bytes_host = device_bytes // len(requests), host_bytes // len(requests)
            m.kv_bytes_device_peak = max(m.kv_bytes_device_peak, m.kv_bytes_device)
            m.method_stats = {k: v / len(requests) for k, v in stats.items()}
            m.peak_memory_bytes = self._peak_memory()
            kept = tokens[:-1] if stopped else tokens
            text = self.tokenizer.decode(kept, skip_special_tokens=True) if self.tokenizer is not None else ""
            generations.append(Generation(tokens, text, m, stopped=stopped))
        return generations

    def _decode(self, cache: KVCache, state: DecodeState) -> tuple[int, float, float, list[int]]:
        """Run decode steps until every sequence is done. Returns (timed steps, their seconds, seconds of
        compile/capture/warm-up, per-sequence token counts before the timed steps)."""
        remaining = int(state.max_new.max()) - 1  # the first token came from the prefill's logits
        if remaining <= 0 or bool(state.done.all()):
            return 0, 0.0, 0.0, state.count.tolist()
        with self._layers_compiled():
            step, compile_s, ran = self._step_runner(cache, state, remaining)
            remaining -= ran
            before = state.count.tolist()
            steps = 0
            with Timer(self.device) as timer:
                while steps < remaining:
                    step()
                    steps += 1
                    if steps % STOP_CHECK_EVERY == 0 and bool(state.done.all()):
                        break
        return steps, timer.seconds if steps else 0.0, compile_s, before

    def _compile_kwargs(self) -> dict:
        """`torch.compile`'s extra arguments: `compile_options` (tests, profile_step's autotuning), with
        `inductor_options` merged into its options. `torch.compile` takes a mode or options, not both, so a
        mode becomes its options; a test's own backend takes no Inductor options."""
        given = dict(self.compile_options)
        if not self.inductor_options or "backend" in given:
            return given
        mode = given.pop("mode", None)
        modes = torch._inductor.list_mode_options(mode) if mode else {}
        return {**given, "options": {**modes, **given.get("options", {}), **self.inductor_options}}

    @torch.inference_mode()
    def score_continuation(self, prefix_ids: Sequence[int], continuation_ids: Sequence[int]) -> Scored:
        """NLL of each continuation token, fed one at a time through the method's cache after the prefix
        is prefilled (and compressed): evicted or quantized tokens affect every prediction."""
        m = Measurement(engine="eager", dense_kv_bytes=self._dense_bytes(len(prefix_ids) + len(continuation_ids)))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        request = Request(prefix_ids, len(continuation_ids))
        cache, logits = self._prefill_one(request, len(prefix_ids), len(continuation_ids), m)
        targets = torch.tensor(list(continuation_ids), device=self.device)
        nll = torch.zeros((), dtype=torch.float64, device=self.device)
        position = len(prefix_ids)
        with Timer(self.device) as timer:
            for i, target in enumerate(continuation_ids):
                nll -= torch.log_softmax(logits.float(), dim=-1)[targets[i]]
                if i + 1 < len(continuation_ids):
                    logits = self._forward(cache, [target], position)[-1]
                    position += 1
                    m.decode_steps += 1
        m.decode_s = timer.seconds
        m.decode_tokens = m.decode_steps
        m.kv_bytes_device, m.kv_bytes_host = cache.kv_bytes()
        m.kv_bytes_device_peak = max(m.kv_bytes_device_peak, m.kv_bytes_device)
        m.method_stats = cache.stats()
        m.peak_memory_bytes = self._peak_memory()
        return Scored(float(nll), len(continuation_ids), m)

    def warmup(self) -> None:
        """One short generation so that first-call costs (allocations, kernel selection) are not timed."""
        self.generate(list(range(1, 17)), max_new_tokens=3)


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / max(tokens, 1))
