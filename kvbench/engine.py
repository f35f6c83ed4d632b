"""The eager engine: chunked prefill, token-by-token decode, timing and memory, with the method's cache.

Timing synchronizes the device around each measured region (CUDA events would avoid the host waits but
the eager path is launch-bound anyway; the compiled path will time with events). Warm-up is excluded.
"""

from __future__ import annotations

import inspect
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvbench import attention
from kvbench.cache import KVCache, ModelSpec
from kvbench.method import Method
from kvbench.models import rope_inv_freq


@dataclass
class Measurement:
    """What one sample cost: time, and bytes counted from the cache's tensors."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    kv_bytes_device: int = 0  # after the sample, what the cache holds where attention runs
    kv_bytes_device_peak: int = 0  # the most it held (prefill holds the whole prompt)
    kv_bytes_host: int = 0
    dense_kv_bytes: int = 0  # a dense cache preallocated for the same prompt and decode tokens
    peak_memory_bytes: int = 0
    method_stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Sampling:
    """Temperature / nucleus sampling; one seeded generator per generation, so runs repeat exactly."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            outside = ordered.cumsum(-1) - ordered >= self.top_p
            probs = torch.zeros_like(probs).scatter_(-1, order, ordered.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))


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
    measurement: Measurement


class Engine:
    def __init__(
        self, model: torch.nn.Module, tokenizer, method: Method, spec: ModelSpec, prefill_chunk: int = 512
    ) -> None:
        self.model, self.tokenizer, self.method, self.spec = model, tokenizer, method, spec
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.inv_freq = rope_inv_freq(model)
        # transformers renamed `past_key_values` to `cache` (5.2x); accept both.
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # Chat models may end a turn with several tokens (e.g. Llama-3.1's 128001/128008/128009).
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.model_stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    # ----- building blocks -----
    def new_cache(self, prompt_len: int, decode_len: int) -> KVCache:
        return self.method.make_cache(self.spec, prompt_len, decode_len, 1, self.inv_freq)

    def _forward(self, cache: KVCache, ids: Sequence[int], start: int, all_logits: bool = False):
        tokens = torch.tensor([list(ids)], device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        with attention.bind(cache):
            out = self.model(
                input_ids=tokens,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
                **{self.cache_kwarg: cache},
            )
        return out.logits[0]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prefill(self, cache: KVCache, prompt: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        logits = []
        for start in range(0, len(prompt), self.prefill_chunk):
            chunk = prompt[start : start + self.prefill_chunk]
            logits.append(self._forward(cache, chunk, start, all_logits))
        return torch.cat(logits)

    def _dense_bytes(self, tokens: int) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.spec.num_layers * self.spec.num_kv_heads * self.spec.head_dim * element * tokens

    def _start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _finish(self, cache: KVCache, m: Measurement) -> None:
        device_bytes, host_bytes = cache.kv_bytes()
        m.kv_bytes_device, m.kv_bytes_host = device_bytes, host_bytes
        m.kv_bytes_device_peak = max(m.kv_bytes_device_peak, device_bytes)
        m.method_stats = cache.stats()
        if self.device.type == "cuda":
            m.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        else:  # the process's peak resident set (weights included); Linux reports KiB
            m.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _prefill_timed(self, cache: KVCache, prompt: Sequence[int], m: Measurement, all_logits: bool):
        self._sync()
        begin = time.perf_counter()
        logits = self._prefill(cache, prompt, all_logits)
        m.kv_bytes_device_peak = cache.kv_bytes()[0]
        cache.finish_prefill()
        self._sync()
        m.prefill_s = time.perf_counter() - begin
        m.prompt_tokens = len(prompt)
        return logits

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
        """Greedy generation, or sampled with `sampling`. `question_ids`, if given, follow the prompt
        through the decode path one token at a time (the two-phase protocol: the question meets an
        already-compressed context). Stop tokens cannot be produced before `min_new_tokens`."""
        cache = self.new_cache(len(prompt_ids), len(question_ids) + max_new_tokens)
        m = Measurement(dense_kv_bytes=self._dense_bytes(len(prompt_ids) + len(question_ids) + max_new_tokens))
        self._start()
        logits = self._prefill_timed(cache, prompt_ids, m, all_logits=False)[-1]
        position = len(prompt_ids)
        if question_ids:
            self._sync()
            begin = time.perf_counter()
            for token in question_ids:
                logits = self._forward(cache, [token], position)[-1]
                position += 1
            self._sync()
            m.prefill_s += time.perf_counter() - begin
            m.prompt_tokens += len(question_ids)

        generated: list[int] = []
        stops = set(stop_ids) | self.model_stop_ids
        generator = torch.Generator().manual_seed(sampling.seed) if sampling else None
        self._sync()
        begin = time.perf_counter()
        stop_list = sorted(stops)
        while True:
            if len(generated) < min_new_tokens and stop_list:
                logits = logits.index_fill(-1, torch.tensor(stop_list, device=logits.device), float("-inf"))
            token = sampling.pick(logits, generator) if sampling else int(logits.argmax())
            generated.append(token)
            if token in stops or len(generated) >= max_new_tokens:
                break
            logits = self._forward(cache, [token], position)[-1]
            position += 1
            m.decode_steps += 1
        self._sync()
        m.decode_s = time.perf_counter() - begin
        self._finish(cache, m)
        kept = [t for t in generated if t not in stops]
        text = self.tokenizer.decode(kept, skip_special_tokens=True) if self.tokenizer is not None else ""
        return Generation(generated, text, m, stopped=generated[-1] in stops)

    @torch.inference_mode()
    def score_continuation(self, prefix_ids: Sequence[int], continuation_ids: Sequence[int]) -> Scored:
        """NLL of each continuation token, fed one at a time through the method's cache after the prefix
        is prefilled (and compressed): evicted or quantized tokens affect every prediction."""
        cache = self.new_cache(len(prefix_ids), len(continuation_ids))
        m = Measurement(dense_kv_bytes=self._dense_bytes(len(prefix_ids) + len(continuation_ids)))
        self._start()
        logits = self._prefill_timed(cache, prefix_ids, m, all_logits=False)[-1]
        nll = 0.0
        self._sync()
        begin = time.perf_counter()
        position = len(prefix_ids)
        for i, target in enumerate(continuation_ids):
            nll -= float(torch.log_softmax(logits.float(), dim=-1)[target])
            if i + 1 < len(continuation_ids):
                logits = self._forward(cache, [target], position)[-1]
                position += 1
                m.decode_steps += 1
        self._sync()
        m.decode_s = time.perf_counter() - begin
        self._finish(cache, m)
        return Scored(nll, len(continuation_ids), m)

    @torch.inference_mode()
    def sliding_window_nll(self, token_ids: Sequence[int], window: int, stride: int) -> tuple[float, int]:
        """The usual perplexity protocol, no cache: each window scores the tokens past the previous one."""
        nll, counted, previous_end = 0.0, 0, 0
        for begin in range(0, len(token_ids), stride):
            end = min(begin + window, len(token_ids))
            ids = torch.tensor([token_ids[begin:end]], device=self.device)
            with attention.bind(None):
                logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
            new = end - previous_end  # tokens this window scores for the first time
            targets = ids[0, -new:][1 if begin == 0 else 0 :]
            predictions = logits[-new - 1 : -1] if begin > 0 else logits[: new - 1]
            nll += float(torch.nn.functional.cross_entropy(predictions, targets, reduction="sum"))
            counted += targets.numel()
            previous_end = end
            if end == len(token_ids):
                break
        return nll, counted

    def warmup(self) -> None:
        """One short generation so that first-call costs (allocations, kernel selection) are not timed."""
        self.generate(list(range(1, 17)), max_new_tokens=3)


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / max(tokens, 1))
