"""Checkpoints of the shared training loop: atomic ``checkpoint-N`` folders, rotation, and resume.

A checkpoint holds the model (``model/``, the trainer's :meth:`save_model`), the optimizer and scheduler states, the
trainer's extra state (replay buffer, log Z table), every process's RNG state (:mod:`twistlm.rng_state`; no pickle
is ever loaded) and ``trainer_state.json`` (step, log history, config, run facts, number of processes). It is
written into a temporary folder and renamed into place, so a kill leaves either the old or the new checkpoint. Resume
refuses a checkpoint made with other settings (the config's ``resume_keys`` and :data:`RUN_INFO_KEYS`; a setting
absent from an older checkpoint counts as its default), and falls back past damaged newer checkpoints with a warning.

:class:`CheckpointMixin` is mixed into :class:`twistlm.trainloop.TrainLoop`, whose attributes it uses (config,
accelerator, optimizer, scheduler, state, generator, rank, run_info, output_dir, sample_history) and whose hooks it
calls (``save_model``, ``load_model``, ``extra_state``, ``load_extra_state``, ``_event``, ``_warn``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from twistlm import rng_state
from twistlm.errors import ConfigError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"
EXTRA_NAME = "extra_state.pt"
RUN_INFO_KEYS = ("task", "task_options", "training_task_options", "model_name", "max_new_tokens")
"""Run facts a resumed run must share with its checkpoint, besides the config's own ``resume_keys``."""


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


class CheckpointMixin:
    """Writing, rotating and resuming from checkpoints (module docstring)."""

    # -- RNG states (no pickle) --------------------------------------------------------------------------------------

    def _save_rng(self, directory: Path) -> None:
        """Every process's RNG state: gathered to the main process, which writes one pair of files per rank."""
        mine = (self.rank, *rng_state.capture(self.generator))
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            gathered = gather_object([mine])
        else:
            gathered = [mine]
        if self.accelerator.is_main_process:
            for rank, tensors, plain in gathered:
                rng_state.write(directory, rank, tensors, plain)

    def _load_rng(self, directory: Path) -> None:
        rng_state.restore(directory, self.rank, self.generator)

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write ``output_dir/checkpoint-N`` atomically (temporary folder + ``os.replace``); collective call."""
        step = self.state.global_step
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._save_rng(tmp)  # collective: every process contributes its own state
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return None
        self.save_model(tmp / "model")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        extra = self.extra_state()
        if extra:
            torch.save(extra, tmp / EXTRA_NAME)
        state = {
            "global_step": step,
            "log_history": self.state.log_history,
            "loss_window": self._window,
            "sample_history": self.sample_history,
            "config": self.config.to_dict(),
            "run_info": {k: self.run_info.get(k) for k in RUN_INFO_KEYS if k in self.run_info},
            "num_processes": self.accelerator.num_processes,
        }
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2, default=str))
        if final.exists():
            old = self.output_dir / f".old-checkpoint-{step}-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        self._rotate_checkpoints()
        self._event("on_save", checkpoint=str(final))
        self.accelerator.wait_for_everyone()
        return final

    def _rotate_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if not limit:
            return
        for old in list_checkpoints(self.output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _check_resume(self, ckpt: Path, saved: dict) -> None:
        mine = self.config.to_dict()
        keys = type(self.config).resume_keys
        # A setting newer than the checkpoint is absent from it: the run had that field's default.
        defaults = {f.name: f.default for f in dataclasses.fields(self.config)}
        old = {k: saved["config"].get(k, defaults.get(k)) for k in keys}
        changed = [(k, old[k], mine.get(k)) for k in keys if old[k] != mine.get(k)]
        info = saved.get("run_info", {})
        changed += [
            (k, info.get(k), self.run_info.get(k))
            for k in RUN_INFO_KEYS
            if k in info and k in self.run_info and _canonical(info.get(k)) != _canonical(self.run_info.get(k))
        ]
        procs = saved.get("num_processes", 1)
        if procs != self.accelerator.num_processes:
            changed.append(("num_processes", procs, self.accelerator.num_processes))
        if changed:
            raise ConfigError(
                f"cannot resume from {ckpt}: it was trained with different settings ("
                + ", ".join(f"{k}={a!r} vs {b!r}" for k, a, b in changed)
                + ")"
            )

    def _load_files(self, ckpt: Path) -> None:
        self.load_model(ckpt / "model")
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        self._load_rng(ckpt)
        if (ckpt / EXTRA_NAME).is_file():
            self.load_extra_state(torch.load(ckpt / EXTRA_NAME, weights_only=True))

    def _resume(self) -> None:
        if self.accelerator.is_main_process:
            for stale in self.output_dir.glob(".tmp-checkpoint-*"):
                shutil.rmtree(stale, ignore_errors=True)  # a run killed while writing: never complete, never read
        self.accelerator.wait_for_everyone()
        checkpoints = list_checkpoints(self.output_dir)
        skipped = []
        for ckpt in reversed(checkpoints):
            try:
                saved = json.loads((ckpt / STATE_NAME).read_text())
            except (OSError, ValueError) as exc:
                skipped.append(f"{ckpt.name} ({type(exc).__name__})")
                continue
            self._check_resume(ckpt, saved)  # other settings: refused, never skipped
            try:
                self._load_files(ckpt)
            except Exception as exc:  # a truncated, corrupted or unsafe file: fall back to an older checkpoint  # noqa: BLE001
                skipped.append(f"{ckpt.name} ({type(exc).__name__}: {str(exc)[:80]})")
                continue
            if skipped:
                self._warn(f"resuming from {ckpt.name}: newer checkpoints are damaged: {'; '.join(skipped)}")
            self.state.global_step = int(saved["global_step"])
            self.state.log_history = list(saved["log_history"])
            self._window = list(saved.get("loss_window", []))
            self.sample_history = list(saved.get("sample_history", []))
            return
        if skipped:
            raise ConfigError(f"cannot resume from {self.output_dir}: no checkpoint is intact ({'; '.join(skipped)})")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
