"""The training loop every twistlm trainer shares: callbacks, schedule, accelerate, logging, checkpoints, resume.

:class:`TrainLoop` holds what a twist trainer (:mod:`twistlm.training`) and a GFlowNet trainer
(:mod:`twistlm.gfn.trainer`) have in common; a trainer subclasses it and supplies

* ``training_step() -> (loss, info)`` — sample, compute the loss, call :meth:`TrainLoop.optimizer_step`;
* ``eval_metrics(info) -> dict`` — what is logged every ``logging_steps`` besides the loss;
* ``save_model(dir)`` / ``load_model(dir)`` — the trained object (a twist, a LoRA adapter);
* optionally ``extra_state() -> dict`` / ``load_extra_state(dict)`` — tensors to checkpoint (replay buffers, ...),
  stored with ``torch.save`` and read back with ``weights_only=True`` (tensors and plain containers only).

Hugging Face conventions kept: a dataclass config (:class:`LoopConfig`, parsable by ``HfArgumentParser``),
``transformers.TrainerCallback`` callbacks called with a real ``TrainerState`` / ``TrainerControl``,
``get_scheduler`` schedules, ``output_dir/checkpoint-N`` folders with ``save_total_limit``, an
``accelerate.Accelerator`` for device placement and ``accelerate launch`` / ``torchrun`` (each process samples with
its own seed offset; gradients are averaged; metrics are averaged over processes and logged once; the main process
writes files).

Checkpoints (:mod:`twistlm.checkpoints`, mixed into :class:`TrainLoop`) hold the model, optimizer, scheduler, the
step, the log history and **every process's** RNG states (the sampler's generator, torch, CUDA, Python, NumPy). Nothing is unpickled on resume: RNG tensors are safetensors,
Python/NumPy states JSON, optimizer/scheduler/extra state go through ``torch.load(weights_only=True)``. A checkpoint is
written to a temporary folder and moved into place with ``os.replace``; a run killed at any moment leaves only
complete checkpoints, and ``resume`` continues from the newest one that reads back intact (falling back to older ones,
and saying so) with the same result as the uninterrupted run. Ctrl-C lets the current update finish, writes its
checkpoint and then stops (:mod:`twistlm.interrupts`; a second Ctrl-C stops at once, and resume continues from the
last checkpoint). A non-empty ``output_dir`` is refused unless ``resume`` or ``overwrite``; a resume
whose settings (including the task, its options, the horizon and the model) differ from the checkpoint's is refused
naming the field.
"""

from __future__ import annotations

import atexit
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twistlm.checkpoints import CheckpointMixin, list_checkpoints
from twistlm.errors import ConfigError, TwistLMError
from twistlm.files import atomic_write_text
from twistlm.html.training_page import write_training_page
from twistlm.interrupts import DeferredInterrupt
from twistlm.training_curves import plot_training_curves

CONFIG_NAME = "training_config.json"
HISTORY_NAME = "log_history.json"
CURVE_NAME = "training_curve.png"
TRAINING_PAGE_NAME = "training.html"
MAX_SAMPLE_SNAPSHOTS = 64
"""Sample snapshots kept for training.html; when full, every other one is dropped (the newest always kept)."""
EXAMPLES_PER_SNAPSHOT = 4
"""Samples a trainer's :meth:`TrainLoop.example_samples` returns per logging step."""
SEED_STRIDE = 1_000_003
"""Process r of a multi-process run seeds its generators with ``seed + SEED_STRIDE · r`` (disjoint samples)."""


@dataclass
class LoopConfig:
    """Settings every trainer shares; trainers extend it with their own fields (``HfArgumentParser`` parses both)."""

    output_dir: str = field(default="twistlm-out", metadata={"help": "Where checkpoints and the final model go."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    max_steps: int = field(default=200, metadata={"help": "Number of optimizer updates."})
    seed: int = field(default=0, metadata={"help": "Seed of every random draw of the run."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "Learning-rate warmup steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW β1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW β2."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm (0: off)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N updates."})
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every N updates (0: only the final model)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint in output_dir."})
    overwrite: bool = field(default=False, metadata={"help": "Start afresh in an output_dir that holds another run."})
    plot: bool = field(default=True, metadata={"help": "Write training_curve.png and training.html at the end."})

    resume_keys = ("seed", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm")
    """Settings a resumed run must share with its checkpoint (others, e.g. logging or max_steps, may change)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "logging_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)) or (
            self.learning_rate <= 0
        ):
            raise ConfigError(f"learning_rate must be positive and finite, got {self.learning_rate}")
        if self.save_steps < 0:
            raise ConfigError(f"save_steps must be ≥ 0, got {self.save_steps}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must lie in [0, 2^63), got {self.seed}")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def make_accelerator(cpu: bool) -> Any:
    """The ``accelerate.Accelerator`` every trainer uses when none is given. Under ``torchrun`` / ``accelerate
    launch`` it also arranges that the process group is destroyed at interpreter exit: a gloo group left to the
    interpreter's teardown can abort the process ("terminate called without an active exception") after the run
    has finished."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cpu)
    if accelerator.num_processes > 1:
        atexit.unregister(_destroy_process_group)  # once per process, however many trainers it builds
        atexit.register(_destroy_process_group)
    return accelerator


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears its sockets down while another still talks through them
        torch.distributed.destroy_process_group()


class TrainLoop(CheckpointMixin):
    """The shared loop (module docstring). ``params``: parameters, or optimizer parameter groups (dicts).
    ``model`` is what callbacks receive as ``model=``."""

    model: Any = None

    def __init__(self, config: LoopConfig, params: Sequence[Any], *, callbacks: Sequence[Any] = (),
                 run_info: dict | None = None, accelerator: Any = None, cpu: bool = True):
        from transformers import TrainerControl, TrainerState, get_scheduler

        self.config = config
        self.callbacks = list(callbacks)
        self.run_info = dict(run_info or {})
        self.accelerator = accelerator or make_accelerator(cpu)
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ConfigError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
        )
        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps,
        )
        self.rank = self.accelerator.process_index
        seed = config.seed + SEED_STRIDE * self.rank
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.state = TrainerState(
            max_steps=config.max_steps,
            logging_steps=config.logging_steps,
            save_steps=config.save_steps,
            log_history=[],
            is_local_process_zero=self.accelerator.is_local_main_process,
            is_world_process_zero=self.accelerator.is_main_process,
        )
        self.control = TrainerControl()
        self._window: list[float] = []
        self.sample_history: list[dict] = []
        self.output_dir = Path(config.output_dir)

    # -- what a trainer supplies -------------------------------------------------------------------------------------

    def training_step(self) -> tuple[float, Any]:
        raise NotImplementedError

    def eval_metrics(self, info: Any) -> dict[str, float]:
        return {}

    def example_samples(self, info: Any) -> list[dict] | None:
        """A few samples of the step (``[{"text": str, name: number, ...}]``) recorded at every logging step for
        training.html; default: none. Must not draw random numbers (it would change the training trajectory)."""
        return None

    def prepare(self) -> None:
        """Work before the first update, once the output folder is claimed or the checkpoint restored (e.g. drawing
        a cached corpus into it). Default: nothing."""

    def save_model(self, directory: Path) -> None:
        raise NotImplementedError

    def load_model(self, directory: Path) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # -- callbacks ---------------------------------------------------------------------------------------------------

    def add_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def _event(self, name: str, **kwargs: Any) -> None:
        for cb in self.callbacks:
            hook = getattr(cb, name, None)
            if callable(hook):
                result = hook(
                    self.config,
                    self.state,
                    self.control,
                    model=self.model,
                    optimizer=self.optimizer,
                    lr_scheduler=self.scheduler,
                    **kwargs,
                )
                if result is not None and hasattr(result, "should_training_stop"):
                    self.control = result

    # -- one optimizer step ------------------------------------------------------------------------------------------

    def optimizer_step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor] | None = None) -> float:
        """Backward, average gradients over processes, clip, step, schedule; returns the loss value.

        A non-finite loss stops the run before the step, naming the step and (``terms``) the non-finite term; the
        last checkpoint stays as it was.
        """
        value = float(loss.detach())
        if not math.isfinite(value):
            bad = [k for k, v in (terms or {}).items() if not bool(torch.isfinite(v.detach()).all())]
            where = f" (non-finite term: {', '.join(bad)})" if bad else ""
            raise TwistLMError(
                f"the loss is {value} at step {self.state.global_step + 1}{where}; the run stopped with its last "
                "checkpoint intact (lower the learning rate, or check the reward/potential)"
            )
        self.accelerator.backward(loss)
        if self.accelerator.num_processes > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self._event("on_pre_optimizer_step")
        self.optimizer.step()
        self._event("on_optimizer_step")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    # -- the loop ----------------------------------------------------------------------------------------------------

    def train(self) -> Any:
        """Run up to ``max_steps`` updates (continuing from a checkpoint with ``resume``); returns the TrainerState."""
        cfg = self.config
        if cfg.resume:
            self._resume()
        else:
            self._claim_output_dir()
        self.accelerator.wait_for_everyone()  # every rank checks the folder before any writes into it (prepare)
        self.prepare()
        self._event("on_train_begin")
        start = time.perf_counter()
        stop = DeferredInterrupt()
        boundary = True  # the state is that of a finished update (or of the start): safe to checkpoint
        try:
            with stop:
                while self.state.global_step < cfg.max_steps and not self.control.should_training_stop:
                    self._event("on_step_begin")
                    boundary = False
                    value, info = self.training_step()
                    self.state.global_step += 1
                    self.state.epoch = self.state.global_step / cfg.max_steps
                    self._window.append(value)
                    self._event("on_step_end")
                    step = self.state.global_step
                    if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                        self.log(self.eval_metrics(info))
                        self._record_samples(info)
                    if cfg.save_steps and step % cfg.save_steps == 0:
                        self.save_checkpoint()
                    boundary = True
                    if self._any_process(stop.requested):
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            self._on_interrupt(boundary)
            raise
        self.state.train_runtime = time.perf_counter() - start
        self.save_outputs()
        self._event("on_train_end")
        return self.state

    def _any_process(self, flag: bool) -> bool:
        """``flag`` on any process (every process must stop at the same update: checkpoints are collective)."""
        if self.accelerator.num_processes <= 1:
            return flag
        value = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def _on_interrupt(self, boundary: bool) -> None:
        """Checkpoint the last finished update, unless the interrupt landed inside one (its state is neither the
        update's nor the one before it): then the newest periodic checkpoint stands."""
        step = self.state.global_step
        if not boundary:
            last = list_checkpoints(self.output_dir)
            since = f"from {last[-1].name}" if last else "from the start"
            self._warn(f"interrupted inside an update: nothing saved; resume continues {since}")
        elif step > 0 and not (self.output_dir / f"checkpoint-{step}").exists():
            self.save_checkpoint()  # so resume continues from here

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes <= 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    def log(self, metrics: dict[str, float]) -> None:
        loss = float(np.mean(self._window)) if self._window else float("nan")
        reduced = self._reduce_metrics({"loss": loss, **metrics})
        logs = {**reduced, "learning_rate": float(self.scheduler.get_last_lr()[0]), "step": self.state.global_step}
        self._window = []
        self.state.log_history.append(logs)
        self._event("on_log", logs=logs)

    def _record_samples(self, info: Any) -> None:
        """Keep this logging step's :meth:`example_samples` (main process; at most MAX_SAMPLE_SNAPSHOTS)."""
        if not self.accelerator.is_main_process:
            return
        samples = self.example_samples(info)
        if not samples:
            return
        self.sample_history.append({"step": self.state.global_step, "samples": list(samples)})
        if len(self.sample_history) > MAX_SAMPLE_SNAPSHOTS:
            self.sample_history = self.sample_history[:-1][::2] + self.sample_history[-1:]

    # -- output folder -----------------------------------------------------------------------------------------------

    def _claim_output_dir(self) -> None:
        """A fresh run: refuse a folder holding another run's files unless ``overwrite`` (then clear its runs)."""
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output folder {out} exists and is not a folder")
        if not out.is_dir() or not any(out.iterdir()):
            return
        if not self.config.overwrite:
            raise ConfigError(
                f"output folder {out} is not empty (another run?); use resume to continue it or overwrite to replace it"
            )
        if self.accelerator.is_main_process:
            for ckpt in list_checkpoints(out):
                shutil.rmtree(ckpt, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _warn(self, message: str) -> None:
        if self.accelerator.is_main_process:
            import sys

            print(f"warning: {message}", file=sys.stderr)

    # -- final outputs -----------------------------------------------------------------------------------------------

    def save_outputs(self) -> None:
        """The final model, the run's configuration, the log history and (``plot``) the training curves: the PNG and
        the self-contained training.html (:mod:`twistlm.html.training_page`, with the sample snapshots)."""
        if not self.accelerator.is_main_process:
            return
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        self.save_model(out)
        config = {**self.config.to_dict(), **self.output_info(), **self.run_info}
        _write_json(out / CONFIG_NAME, config)
        _write_json(out / HISTORY_NAME, self.state.log_history)
        if self.config.plot:
            plot_training_curves(self.state.log_history, out / CURVE_NAME, self.curve_panels)
            write_training_page(out / TRAINING_PAGE_NAME, self.state.log_history, self.curve_panels,
                                self.sample_history, config)

    def output_info(self) -> dict:
        """Extra fields of ``training_config.json`` (e.g. the proposal actually used)."""
        return {}

    curve_panels: Sequence[tuple[str, str]] = (("loss", "loss"),)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))
