"""Helpers shared by CLI commands: quiet model loading, twist and policy loading, ``key=value`` options, atomic JSON
output.

Checks named ``check_*`` are cheap (no torch work, no model) so commands can reject bad input before spending seconds
loading a model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from twistlm.errors import ConfigError, ModelLoadError, TwistLMError
from twistlm.files import apply_umask
from twistlm.lm import ParticleLM, load_lm
from twistlm.twists.base import Twist

EMBEDDED_LABEL = "embedded"
"""How the CLI names the default model (``--model`` not given)."""

_MODEL_CACHE: dict[str | None, ParticleLM] = {}


# --------------------------------------------------------------------------------------------------------- models


def quiet_transformers() -> None:
    """Silence transformers / huggingface_hub info logs and progress bars ("Loading weights ...")."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hub_logging

        disable_progress_bars()
        hub_logging.set_verbosity_error()
    except ImportError:  # older huggingface_hub: transformers' switches above are enough
        pass


def check_model(name: str | None) -> None:
    """Reject a missing local model path or GGUF file without importing transformers."""
    if name is None or name == TOY_MODEL:
        return
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {name}")
    elif path.exists() and not path.is_dir():
        raise ModelLoadError(
            f"model path {name} is a file, not a model directory (give a model directory, a .gguf file or a hub id)"
        )
    elif name.startswith((".", "/", "~")) and not path.is_dir():
        raise ModelLoadError(f"model path not found: {name}")


TOY_MODEL = "toy"
"""``--model toy``: the seeded toy LM (vocab 5), a testing aid for running a pipeline end to end in seconds."""


def load_model(name: str | None) -> ParticleLM:
    """Load (once per process) the base model p0: ``None`` is the embedded default, ``toy`` the toy LM; logs and
    progress bars quiet."""
    if name == TOY_MODEL:
        from twistlm.toy import ToyLM

        return ToyLM(vocab_size=5, seed=1)
    if name not in _MODEL_CACHE:
        check_model(name)
        quiet_transformers()
        _MODEL_CACHE[name] = load_lm(name)
    return _MODEL_CACHE[name]


# --------------------------------------------------------------------------------------------------------- twists


def check_twist(path: Path, task: str | None = None) -> str:
    """The kind of the twist saved in ``path`` (its config read, the kind checked to be known); no weights are read.
    With ``task``: a twist that records another task (``train-twist`` records it) is refused — its ψ estimates
    another target's future φ."""
    from twistlm.twists import io

    if not path.is_dir():
        raise ConfigError(f"twist directory not found: {path}")
    config = io.read_config(path)
    kind = str(config.get("kind"))
    io.get_twist_kind(kind)
    trained_for = config.get("task")
    if task is not None and trained_for is not None and trained_for != task:
        raise ConfigError(f"twist {path} was trained for task {trained_for!r}, not {task!r}")
    return kind


def load_twist(path: str | os.PathLike, lm: ParticleLM) -> Twist:
    """Load the twist saved in directory ``path`` for base model ``lm`` (any registered kind)."""
    from twistlm.twists import io

    path = Path(path).expanduser()
    check_twist(path)
    return io.load_twist(path, lm).eval()


# -------------------------------------------------------------------------------------------------------- policies

POLICY_PROBLEM_OPTIONS = frozenset({"data", "index", "prompt", "split"})
"""Task options that only pick the problem or prompt: a policy (amortised over prompts) may run on another one than it
was trained on. Any other task option the policy recorded defines the target it was trained for."""


def check_policies(
    paths: list[Path], task: str | None, options: dict[str, Any], model: str | None,
    flags: dict[str, str] | None = None,
) -> tuple[dict[str, Any], int | None]:
    """Cheap checks of GFlowNet policy folders (no model, no weights): their files (a missing one is named), a Hugging
    Face ``model`` (not the toy), that they were trained for ``task`` and with task options that ``options`` (and each
    other) do not contradict. Returns the task options with the policies' own filled in, and the horizon T the
    policies record (None if none). Without a task the policies' task options are not used. ``flags``: the
    command-line flag that set an option, for the error (default ``-o KEY``)."""
    from twistlm.gfn.policy import read_policy_info

    if paths and model == TOY_MODEL:
        raise ConfigError("--policy needs a Hugging Face model: a GFlowNet policy is a LoRA adapter (train-gfn on the "
                          "toy model saves a tabular policy, which the CLI cannot load)")
    merged, source = dict(options), {key: (flags or {}).get(key, f"-o {key}") for key in options}
    horizons: dict[int, Path] = {}
    for path in paths:
        info = read_policy_info(path.expanduser())
        trained = info.get("task")
        if task is not None and trained not in (None, task):
            raise ConfigError(f"policy {path} was trained for task {trained!r}, not {task!r}")
        if task is None:
            continue
        for key, value in (info.get("task_options") or {}).items():
            if key not in merged:
                merged[key], source[key] = value, f"policy {path}"
            elif merged[key] != value and key not in POLICY_PROBLEM_OPTIONS:
                raise ConfigError(f"policy {path} was trained with task option {key}={value!r}, but {source[key]} "
                                  f"sets {key}={merged[key]!r}")
        if info.get("max_new_tokens") is not None:
            horizons.setdefault(int(info["max_new_tokens"]), path)
    if len(horizons) > 1:
        listed = ", ".join(f"T={t} ({p})" for t, p in horizons.items())
        raise ConfigError(f"the --policy folders were trained with different horizons ({listed}): "
                          "give --max-new-tokens")
    return merged, next(iter(horizons), None)


def load_policy_lm(path: Path, model: str | None, base: ParticleLM, task: str | None) -> ParticleLM:
    """The GFlowNet LoRA policy in ``path`` as a proposal next to ``base`` (p0): checked against ``base`` (model,
    vocabulary, tokenizer, task) before any weights are read, then loaded on a private copy of the base model — the
    adapter is injected into the model it is loaded on, so the cached ``base`` keeps computing p0."""
    from twistlm.gfn.policy import check_policy_fits, load_policy

    path = path.expanduser()
    check_policy_fits(base, path, task=task)
    quiet_transformers()
    return load_policy(load_lm(model), path, task=task)


# -------------------------------------------------------------------------------------------------------- options


def parse_value(text: str) -> Any:
    """``"3"`` → 3, ``"0.5"`` → 0.5, ``"true"``/``"false"`` → bool, anything else stays a string."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return text


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["a=1", "name=x"]`` → ``{"a": 1, "name": "x"}`` (values through :func:`parse_value`)."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TwistLMError(f"bad option {item!r}: write it as key=value")
        if key in options:
            raise TwistLMError(f"option {key!r} given twice")
        options[key] = parse_value(value)
    return options


def method_names(spec: str, registry: Any, what: str, hint: str = "") -> list[str]:
    """``"a,b"`` → ``["a", "b"]``, each a key of ``registry`` (else one line naming ``what`` and the choices, plus
    ``hint``), none twice; an empty spec gives []."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    for name in names:
        if name not in registry:
            raise ConfigError(f"unknown {what} {name!r}; choose from: {', '.join(registry)}{hint}")
    if len(set(names)) != len(names):
        raise ConfigError("--methods lists a method twice")
    return names


# ------------------------------------------------------------------------------------------------------------ json


def check_writable(path: Path) -> None:
    """Fail early if ``path``'s folder does not exist (before a long run whose output would be lost)."""
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        raise TwistLMError(f"cannot write {path}: folder {parent} does not exist")
    if path.is_dir():
        raise TwistLMError(f"cannot write {path}: it is a directory")


def json_safe(obj: Any) -> Any:
    """Replace non-finite floats (anywhere in nested dicts/lists) by None, so the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically: a temporary file in the same folder, then ``os.replace``."""
    path = path.expanduser()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(json_safe(data), f, indent=2, ensure_ascii=False, allow_nan=False)
            f.write("\n")
        apply_umask(tmp)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_task_options(task: Any, options: dict[str, Any]) -> None:
    """Reject options the task's ``build`` cannot take (when its signature says so), before loading the model."""
    import inspect

    if "max_new_tokens" in options:
        raise TwistLMError("set the horizon with --max-new-tokens, not as a task option")
    params = list(inspect.signature(task.build).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = [p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(named))
    if unknown:
        allowed = ", ".join(n for n in named if n != "max_new_tokens") or "(none)"
        raise ConfigError(f"task {task.name!r} has no option {unknown[0]!r}; its options: {allowed}")


# ------------------------------------------------------------------------------------------- trainer configs


def config_options(config_cls: type, options: dict, flag_fields: tuple[str, ...]) -> dict:
    """``--train-option key=value`` values checked against the dataclass ``config_cls`` and converted to each field's
    type; fields that have their own flag (``flag_fields``) are refused, so one setting has one spelling."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out = {}
    for key, value in options.items():
        if key in flag_fields:
            raise ConfigError(f"--train-option {key}: use its own flag (--{key.replace('_', '-')} or see --help)")
        if key not in fields:
            choices = ", ".join(sorted(k for k in fields if k not in flag_fields))
            raise ConfigError(f"unknown --train-option {key!r}; choose from: {choices}")
        declared = fields[key].type  # a string, or the class once HfArgumentParser has resolved the annotations
        kind = declared if isinstance(declared, str) else getattr(declared, "__name__", str(declared))
        try:
            if str(value).lower() == "none" and "None" in kind:
                out[key] = None
            elif "bool" in kind:
                out[key] = str(value).lower() in ("1", "true", "yes")
            elif "float" in kind:
                out[key] = float(value)
            elif "int" in kind:
                out[key] = int(value)
            else:
                out[key] = str(value)
        except ValueError:
            raise ConfigError(f"--train-option {key}={value!r}: expected {kind}") from None
    return out


class TrainingProgress:
    """A ``TrainerCallback``-style progress bar: steps, and the last logged values of ``keys`` ((key, label) pairs)."""

    def __init__(self, progress: Any, max_steps: int, keys: tuple[tuple[str, str], ...]):
        self.progress, self.keys = progress, keys
        self.bar = progress.add_task("training", total=max_steps, status=self._status({}))

    def _status(self, logs: dict) -> str:
        return " · ".join(f"{label} {logs.get(key, math.nan):.4g}" for key, label in self.keys)

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress.update(self.bar, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(self.bar, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.progress.update(self.bar, status=self._status(logs or {}))


def run_training(make_trainer: Any, steps: int, keys: tuple[tuple[str, str], ...], quiet: bool) -> tuple[Any, Any]:
    """Build a trainer with ``make_trainer(callbacks)`` and train it under a progress bar; (trainer, TrainerState)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from twistlm.cli.app import err_console

    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps · {task.fields[status]}"),
        TimeElapsedColumn(),
    )
    disable = quiet or not err_console.is_terminal
    with Progress(*columns, console=err_console, transient=True, disable=disable) as progress:
        trainer = make_trainer([TrainingProgress(progress, steps, keys)])
        state = trainer.train()
    return trainer, state
