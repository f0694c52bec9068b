"""The amortized sampler q_θ: the base model plus a peft LoRA adapter (MATH.md, "Amortized inference").

The adapter is injected into the base model's own modules, so one copy of the weights serves both distributions:
with the adapter enabled the model is the policy q_θ, inside :func:`base_model_of` (peft's ``disable_adapter``) it is
the frozen base p0 the rewards are computed with. The policy is exposed as an :class:`~twistlm.lm.HFLM`, i.e. a
:class:`~twistlm.lm.ParticleLM`, so every sampler of twistlm (SIS, SMC, ``solve``) runs on it unchanged.

On disk a policy is a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained(base, DIR)``) plus :data:`POLICY_INFO_NAME`, a small JSON naming the base model, its
vocabulary size, a fingerprint of its tokenizer, the task and what the policy reads (its ``condition``), so a policy is never silently applied to another model.

As a proposal for SMC next to p0 (``run_smc(..., proposal="policy", policy=...)``), load the policy on its own copy
of the base model: the adapter is injected into the model it is loaded on, which then computes q_θ, not p0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from twistlm.conditioning import CONDITIONS, get_condition
from twistlm.errors import ConfigError, ModelLoadError
from twistlm.lm import HFLM

POLICY_INFO_NAME = "gfn_policy.json"
ACTION_SPACE_NAME = "action_space.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONDITION_KEY = "condition"
DEFAULT_CONDITION = "prompt"
"""What a policy saved without a condition reads: the target's prompts."""
FINGERPRINT_CHARS = 16
"""Hex digits kept of the tokenizer's SHA-256 fingerprint (64 bits: a collision by chance is not a concern)."""


@dataclass
class LoraSettings:
    """LoRA adapter shape (peft ``LoraConfig``); ``target_modules`` None means every attention projection."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Sequence[str] | None = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules) if self.target_modules else None,
            bias="none",
            task_type="CAUSAL_LM",
        )


def _require_hf(lm: Any) -> HFLM:
    if not isinstance(lm, HFLM):
        raise ConfigError("a LoRA policy needs a Hugging Face model (not the toy LM)")
    return lm


def attach_lora(lm: HFLM, peft_config: Any, seed: int | None = None) -> HFLM:
    """A policy LM: ``lm``'s model with a fresh LoRA adapter (LoRA's B = 0, so q_θ = p0 at the start).

    ``peft_config``: a peft ``LoraConfig`` (or :class:`LoraSettings`). The returned HFLM shares ``lm``'s weights;
    ``lm`` itself now computes the policy too, except inside :func:`base_model_of`. ``seed``: peft draws LoRA's A
    from the global torch RNG, so without a seed the adapter depends on whatever the process drew before; with one
    it is drawn from ``torch.manual_seed(seed)`` and the global RNG is left as it was.
    """
    from peft import get_peft_model

    lm = _require_hf(lm)
    if isinstance(peft_config, LoraSettings):
        peft_config = peft_config.peft_config()
    if seed is None:
        return _policy_lm(get_peft_model(lm.model, peft_config), lm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(lm.model, peft_config)
    return _policy_lm(peft_model, lm)


def _policy_lm(peft_model: Any, lm: HFLM) -> HFLM:
    policy = HFLM(peft_model.get_base_model(), lm.tokenizer, name=lm.name)
    policy.peft_model = peft_model  # type: ignore[attr-defined]
    return policy


def peft_model_of(policy: HFLM) -> Any:
    model = getattr(policy, "peft_model", None)
    if model is None:
        raise ConfigError("this LM carries no LoRA adapter (build it with attach_lora or load_policy)")
    return model


@contextlib.contextmanager
def base_model_of(policy: HFLM) -> Iterator[HFLM]:
    """Within the block, ``policy`` computes the frozen base p0 (the adapter is disabled)."""
    with peft_model_of(policy).disable_adapter():
        yield policy


def save_policy(policy: HFLM, directory: str | os.PathLike, *, task: str | None = None, extra: dict | None = None,
                space: Any = None):
    """``save_pretrained`` of the adapter into ``directory`` plus :data:`POLICY_INFO_NAME` (and the policy's action
    space, when given: :data:`ACTION_SPACE_NAME` holds the allowed-token mask, the JSON the rest)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_model_of(policy).save_pretrained(str(directory))
    info = {"base_model": policy.name, "vocab_size": policy.vocab_size, "tokenizer": tokenizer_fingerprint(policy),
            "task": task, **(extra or {})}
    if space is not None:
        save_file({"allowed": space.allowed.to(torch.uint8).contiguous()}, str(directory / ACTION_SPACE_NAME))
        info["action_space"] = {"stop_ids": list(space.stop_ids), "min_len": space.min_len,
                                "max_len": space.max_len, "stop_after_tool": space.stop_after_tool}
    tmp = directory / f".{POLICY_INFO_NAME}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, directory / POLICY_INFO_NAME)
    return directory


def tokenizer_fingerprint(lm: Any) -> str | None:
    """A short SHA-256 of the tokenizer's vocabulary (token → id), or None for an LM without a HF tokenizer."""
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:FINGERPRINT_CHARS]


def read_policy_info(directory: str | os.PathLike) -> dict:
    """The policy's JSON info; a missing folder or file is named in the error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"policy folder not found: {directory}")
    for name in (POLICY_INFO_NAME, ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise ModelLoadError(f"policy folder {directory} has no {name} (is it a train-gfn output?)")
    try:
        return json.loads((directory / POLICY_INFO_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {directory / POLICY_INFO_NAME}: {exc}") from None


class LoRAPolicy:
    """The trainable policy: ``lm`` (an HFLM view of base + adapter) for sampling, :meth:`log_probs_at` with grad for
    the objectives, :meth:`base` for the frozen p0 the rewards use. Any object with these four members (and
    ``parameters``, ``save_pretrained``, ``load_weights``) can be trained, e.g. the toy
    :class:`~twistlm.gfn.toy_policy.TabularPolicy`."""

    def __init__(self, lm: HFLM):
        self.lm = lm
        peft_model_of(lm)

    @classmethod
    def create(cls, lm: HFLM, peft_config: Any) -> LoRAPolicy:
        return cls(attach_lora(lm, peft_config))

    def parameters(self):
        return [p for p in peft_model_of(self.lm).parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        peft_model_of(self.lm).train(mode)

    def base(self):
        """Context manager: within it, ``self.lm`` computes p0."""
        return base_model_of(self.lm)

    def log_probs_at(self, prompts, trajs, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """log p_θ(· | prompt, z_1:cols[k]) of trajectory rows[k], (M, V), with grad (one forward over the batch)."""
        from twistlm.gfn.scoring import head_logprobs, prefix_pass

        ppass = prefix_pass(self.lm, prompts, trajs.prompt_index, trajs.tokens)
        return head_logprobs(self.lm, ppass, rows, cols)

    def save_pretrained(self, directory, *, task: str | None = None, extra: dict | None = None,
                        space: Any = None) -> None:
        save_policy(self.lm, directory, task=task, extra=extra, space=space)

    def load_weights(self, directory) -> None:
        """Adapter weights of a checkpoint folder into this policy (same shapes)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(directory) / ADAPTER_WEIGHTS
        if not path.is_file():
            raise ModelLoadError(f"checkpoint {directory} has no {ADAPTER_WEIGHTS}")
        set_peft_model_state_dict(peft_model_of(self.lm), load_file(str(path)))


def load_action_space(directory: str | os.PathLike) -> Any:
    """The action space the policy in ``directory`` was trained with (None if it saved none)."""
    from safetensors.torch import load_file

    from twistlm.gfn.sampling import ActionSpace

    info = read_policy_info(directory)
    spec = info.get("action_space")
    if spec is None:
        return None
    try:
        allowed = load_file(str(Path(directory) / ACTION_SPACE_NAME))["allowed"].bool()
    except Exception as exc:  # missing or corrupted file  # noqa: BLE001
        raise ModelLoadError(f"cannot read {Path(directory) / ACTION_SPACE_NAME}: {exc}") from None
    return ActionSpace(allowed, tuple(spec["stop_ids"]), int(spec["min_len"]), int(spec["max_len"]),
                       bool(spec["stop_after_tool"]))


def check_policy_fits(lm: Any, directory: str | os.PathLike, *, task: str | None = None) -> dict:
    """The policy's info, after checking that it was trained on ``lm`` (name, vocabulary size, tokenizer when
    recorded) and, when ``task`` is given, for that task; a :class:`~twistlm.errors.ConfigError` naming both otherwise.
    Reads no weights."""
    info = read_policy_info(directory)
    if info.get("base_model") != lm.name or int(info.get("vocab_size", -1)) != lm.vocab_size:
        raise ConfigError(
            f"policy {directory} was trained on base model {info.get('base_model')!r} "
            f"(vocabulary {info.get('vocab_size')}), not on {lm.name!r} (vocabulary {lm.vocab_size})"
        )
    recorded, ours = info.get("tokenizer"), tokenizer_fingerprint(lm)
    if recorded is not None and ours is not None and recorded != ours:
        raise ConfigError(
            f"policy {directory} was trained with another tokenizer (fingerprint {recorded}, this model's {ours})"
        )
    if task is not None and info.get("task") not in (None, task):
        raise ConfigError(f"policy {directory} was trained for task {info.get('task')!r}, not {task!r}")
    condition = info.get(CONDITION_KEY, DEFAULT_CONDITION)
    if condition not in CONDITIONS:
        raise ConfigError(f"policy {directory} reads its prompt as {condition!r}, which this version does not know "
                          f"(known: {', '.join(CONDITIONS)})")
    return info


def load_policy(lm: HFLM, directory: str | os.PathLike, *, task: str | None = None) -> HFLM:
    """The policy saved in ``directory`` on top of ``lm`` (which must be the base it was trained on).

    A policy trained for another base model, vocabulary, tokenizer or (when ``task`` is given) task is refused with
    a :class:`~twistlm.errors.ConfigError` naming both (:func:`check_policy_fits`). The adapter is injected into
    ``lm``'s model in place: ``lm`` computes q_θ too from now on (see the module docstring). The returned LM carries
    the policy's prompt rule as ``.condition`` (:mod:`twistlm.conditioning`; samplers find it there).
    """
    from peft import PeftModel

    lm = _require_hf(lm)
    info = check_policy_fits(lm, directory, task=task)
    try:
        peft_model = PeftModel.from_pretrained(lm.model, str(directory), is_trainable=False)
    except Exception as exc:  # a corrupted adapter file surfaces as many different exception types  # noqa: BLE001
        raise ModelLoadError(f"cannot load the adapter in {directory}: {exc}") from None
    policy = _policy_lm(peft_model, lm)
    policy.condition = get_condition(info.get(CONDITION_KEY, DEFAULT_CONDITION))  # type: ignore[attr-defined]
    return policy
