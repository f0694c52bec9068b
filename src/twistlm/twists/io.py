"""Saving, loading and building twists by ``kind``.

Every twist is saved in the :class:`~twistlm.twists.linear.LinearTwist` format: a directory with

* ``twist.safetensors`` — the twist's own parameters (for the LoRA twist: adapters + head, not the frozen base copy);
* ``twist_config.json`` — ``kind``, ``vocab_size``, ``hidden_size`` (where the twist reads the base LM's hidden
  state), ``base_model`` and the constructor arguments of that kind; :func:`save_twist` adds ``task``.

:func:`load_twist` reads ``kind``, looks the class up in :data:`TWIST_KINDS` and refuses, with a
:class:`~twistlm.errors.ConfigError`, a twist saved for another base model or another vocabulary / hidden size.
:func:`build_twist` makes a fresh twist of a kind for a base LM (and, for kinds that need it, a target).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from twistlm.errors import ConfigError
from twistlm.files import apply_umask
from twistlm.lm import ParticleLM

if TYPE_CHECKING:  # pragma: no cover
    from twistlm.target import Target
    from twistlm.twists.base import Twist

CONFIG_NAME = "twist_config.json"
WEIGHTS_NAME = "twist.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Low-level file helpers shared by the twist classes.


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_weights(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write ``twist.safetensors`` and ``twist_config.json`` into ``directory`` (each atomically)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS_NAME + f".tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    apply_umask(tmp)  # safetensors creates 0600 files
    os.replace(tmp, directory / WEIGHTS_NAME)
    write_json_atomic(directory / CONFIG_NAME, config)


def read_config(directory: str | os.PathLike, kind: str | None = None) -> dict:
    """The ``twist_config.json`` of a saved twist (checked to be of ``kind`` when given)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"no twist found in {directory} (missing {CONFIG_NAME})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if kind is not None and cfg.get("kind") != kind:
        raise ConfigError(f"twist in {directory} is of kind {cfg.get('kind')!r}, not {kind!r}")
    return cfg


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise ConfigError(f"no twist weights in {directory} (missing {WEIGHTS_NAME})")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own SafetensorError (header, size) or an OSError
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path} is corrupted or truncated ({detail}): retrain the twist or restore the file") from exc


def check_compatible(cfg: dict, lm: ParticleLM | None, directory: str | os.PathLike, check_name: bool = False) -> None:
    """Refuse a twist saved for another vocabulary / hidden size (and, with ``check_name``, another model name)."""
    if lm is None:
        return
    where = f"twist in {directory}"
    trained_for = cfg.get("base_model") or "an unnamed model"
    if int(cfg.get("vocab_size", -1)) != lm.vocab_size:
        raise ConfigError(
            f"{where} was trained for {trained_for!r} with vocabulary size {cfg.get('vocab_size')}, but this model "
            f"({lm.name!r}) has {lm.vocab_size} tokens"
        )
    if cfg.get("hidden_size") is not None and int(cfg["hidden_size"]) != lm.hidden_size:
        raise ConfigError(
            f"{where} was trained for {trained_for!r} with hidden size {cfg['hidden_size']}, but this model "
            f"({lm.name!r}) has hidden size {lm.hidden_size}"
        )
    if check_name and cfg.get("base_model") and cfg["base_model"] != lm.name:
        raise ConfigError(
            f"{where} was trained for base model {cfg['base_model']!r}, not for {lm.name!r} "
            "(pass allow_other_model=True to load it anyway)"
        )


def max_index(index: torch.Tensor) -> int:
    """Largest entry of an index tensor (−1 when it is empty)."""
    return int(index.max()) if index.numel() else -1


def twist_state_dict(twist: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that define a trained twist (the LoRA twist leaves out its frozen copy of the base model)."""
    fn = getattr(twist, "twist_state_dict", None)
    return fn() if callable(fn) else dict(twist.state_dict())


def load_twist_state(twist: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load tensors saved by :func:`twist_state_dict` into ``twist`` (every saved tensor must find its place)."""
    own = twist_state_dict(twist)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ConfigError(f"saved twist does not match this twist: missing {missing[:5]}, unexpected {unexpected[:5]}")
    twist.load_state_dict(tensors, strict=False)


# ----------------------------------------------------------------------------------------------------------------
# The kind registry.

TwistBuilder = Callable[..., "Twist"]


class TwistKind:
    """One registered kind: the class (with ``from_pretrained(directory, lm)``) and a builder for fresh twists.

    ``build(lm, target=None, **options)`` makes an untrained twist; ``options`` are the kind's own settings (e.g.
    ``width`` for ``mlp``, ``r`` for ``lora``); unknown options raise :class:`ConfigError`.
    """

    def __init__(self, name: str, cls: type, build: TwistBuilder, description: str = ""):
        self.name, self.cls, self.build, self.description = name, cls, build, description


TWIST_KINDS: dict[str, TwistKind] = {}
_BUILTINS_LOADED = False


def register_twist_kind(kind: TwistKind) -> TwistKind:
    TWIST_KINDS[kind.name] = kind
    return kind


def _load_builtin_kinds() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from twistlm.twists.conditional import ConditionalTwist
    from twistlm.twists.embedding import EmbeddingTwist
    from twistlm.twists.linear import LinearTwist
    from twistlm.twists.lora import LoRATwist
    from twistlm.twists.mlp import MLPTwist
    from twistlm.twists.ratio import RatioTwist
    from twistlm.twists.tabular import TabularTwist

    def linear(lm, target=None, init_scale: float = 0.0, seed: int = 0, output: str = "log", level: bool = True):
        if output != "log":
            raise ConfigError("the linear twist has no sigmoid output; use --twist-kind mlp for FUDGE")
        return LinearTwist.for_lm(lm, init_scale=init_scale, seed=seed, level=level)

    def needs_target(kind, target):
        if target is None:
            raise ConfigError(f"the {kind} twist is built for a target (its prompts / horizon): pass target=")
        return target

    defaults = {
        "linear": (LinearTwist, linear, "linear head on the base LM's last hidden state"),
        "mlp": (MLPTwist, lambda lm, target=None, **kw: MLPTwist.for_lm(lm, **kw), "MLP head on the hidden state"),
        "embedding": (
            EmbeddingTwist,
            lambda lm, target=None, **kw: EmbeddingTwist.for_lm(lm, **kw),
            "MLP features scored against the base LM's own token embeddings (shares learning across tokens)",
        ),
        "tabular": (
            TabularTwist,
            lambda lm, target=None, **kw: TabularTwist.for_target(needs_target("tabular", target), **kw),
            "one free parameter per (prefix, token); tiny vocabularies only (toy LM)",
        ),
        "conditional": (
            ConditionalTwist,
            lambda lm, target=None, **kw: ConditionalTwist.for_target(needs_target("conditional", target), **kw),
            "MLP head on [hidden; embedding of a per-prompt label or observed token sequence]",
        ),
        "lora": (
            LoRATwist,
            lambda lm, target=None, **kw: LoRATwist.for_lm(lm, **kw),
            "LoRA-adapted copy of the base model with its own linear head",
        ),
        "ratio": (
            RatioTwist,
            lambda lm, target=None, **kw: RatioTwist.for_lm(lm, **kw),
            "log q_θ − log p0 of a LoRA-adapted copy q_θ (normalised: the twisted proposal is q_θ, ψ ≡ 1 at start)",
        ),
    }
    for name, (cls, build, doc) in defaults.items():
        TWIST_KINDS.setdefault(name, TwistKind(name, cls, build, doc))


def get_twist_kind(kind: str) -> TwistKind:
    _load_builtin_kinds()
    if kind not in TWIST_KINDS:
        raise ConfigError(f"unknown twist kind {kind!r}; choose from: {', '.join(sorted(TWIST_KINDS))}")
    return TWIST_KINDS[kind]


def build_twist(kind: str, lm: ParticleLM, target: Target | None = None, **options: Any) -> Twist:
    """A fresh (untrained) twist of ``kind`` for ``lm``; ``options`` go to the kind's builder."""
    entry = get_twist_kind(kind)
    try:
        return entry.build(lm, target, **options)
    except TypeError as exc:
        raise ConfigError(f"bad option for twist kind {kind!r}: {exc}") from exc


def save_twist(
    twist: Twist,
    directory: str | os.PathLike,
    base_model_name: str,
    task: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Save ``twist`` with ``save_pretrained`` and record the base model (and task) it was trained for."""
    directory = Path(directory)
    if hasattr(twist, "base_model"):
        twist.base_model = base_model_name
    twist.save_pretrained(directory)
    cfg = read_config(directory)
    cfg["base_model"] = base_model_name
    if task is not None:
        cfg["task"] = task
    if extra:
        cfg.update(extra)
    write_json_atomic(directory / CONFIG_NAME, cfg)
    return directory


def load_twist(directory: str | os.PathLike, lm: ParticleLM, allow_other_model: bool = False) -> Twist:
    """Load a saved twist for ``lm``, dispatching on its ``kind``.

    Refuses a twist trained for another vocabulary or hidden size, and (unless ``allow_other_model``) one whose
    recorded ``base_model`` differs from ``lm.name``.
    """
    cfg = read_config(directory)
    entry = get_twist_kind(str(cfg.get("kind")))
    check_compatible(cfg, lm, directory, check_name=not allow_other_model)
    return entry.cls.from_pretrained(directory, lm)
