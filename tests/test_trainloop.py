"""The shared training loop (twistlm.trainloop): no unpickling on resume, fallback past damaged checkpoints, refusal
of a mismatched resume or an occupied output folder, a checkpoint on Ctrl-C."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from twistlm.errors import ConfigError
from twistlm.training import TwistTrainer
from twistlm.trainloop import list_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import _kill_resume_setup


def _run(out: Path, resume: bool, max_steps: int = 8, **run_info):
    twist, target, cfg = _kill_resume_setup(str(out), resume=resume, max_steps=max_steps)
    info = {"task": "toy", "task_options": {"rating": 1}, "model_name": "toy", "max_new_tokens": 3, **run_info}
    trainer = TwistTrainer(twist, target, cfg, run_info=info)
    trainer.train()
    return trainer


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: proof that a checkpoint file executed code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_checkpoint_file_is_never_executed(tmp_path, one_thread):
    out = tmp_path / "run"
    _run(out, resume=False, max_steps=8)
    marker = tmp_path / "pwned"
    newest = list_checkpoints(out)[-1]
    for name in ("optimizer.pt", "rng_state_0.json"):
        assert (newest / name).exists()
    (newest / "optimizer.pt").write_bytes(pickle.dumps(_Payload(str(marker))))
    (newest / "rng_state.pt").write_bytes(pickle.dumps(_Payload(str(marker))))  # the old pickle name: never read
    trainer = _run(out, resume=True, max_steps=10)
    assert not marker.exists()
    assert trainer.state.global_step == 10  # resumed from the older, intact checkpoint-4 and trained on


def test_resume_falls_back_past_a_truncated_checkpoint_and_says_so(tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    _run(out, resume=False, max_steps=8)
    newest = list_checkpoints(out)[-1]
    weights = next((newest / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:20])
    _run(out, resume=True, max_steps=8)
    err = capsys.readouterr().err
    assert "resuming from checkpoint-4" in err and "checkpoint-8" in err
    for ckpt in list_checkpoints(out):
        (ckpt / "scheduler.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="no checkpoint is intact"):
        _run(out, resume=True, max_steps=12)


def test_resume_with_other_task_options_is_refused_naming_the_field(tmp_path, one_thread):
    out = tmp_path / "run"
    _run(out, resume=False, max_steps=4)
    with pytest.raises(ConfigError, match=r"task_options=\{'rating': 1\} vs \{'rating': 2\}"):
        _run(out, resume=True, max_steps=8, task_options={"rating": 2})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        _run(out, resume=True, max_steps=8, max_new_tokens=5)


def test_an_occupied_output_folder_is_refused_unless_overwrite(tmp_path, one_thread):
    out = tmp_path / "run"
    _run(out, resume=False, max_steps=4)
    with pytest.raises(ConfigError, match="not empty"):
        _run(out, resume=False, max_steps=4)
    twist, target, cfg = _kill_resume_setup(str(out), resume=False, max_steps=4)
    cfg.overwrite = True
    TwistTrainer(twist, target, cfg).train()
    saved = json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert saved["global_step"] == 4


def test_ctrl_c_writes_a_checkpoint_of_the_last_finished_step(tmp_path, one_thread):
    out = tmp_path / "run"
    twist, target, cfg = _kill_resume_setup(str(out), resume=False, max_steps=12)

    class Interrupt:
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt

    trainer = TwistTrainer(twist, target, cfg, callbacks=[Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [p.name for p in list_checkpoints(out)][-1] == "checkpoint-6"
    straight = _kill_resume_setup(str(tmp_path / "straight"), resume=False, max_steps=12)
    a = TwistTrainer(*straight)
    a.train()
    b = TwistTrainer(*_kill_resume_setup(str(out), resume=True, max_steps=12))
    b.train()
    for p, q in zip(a.twist.parameters(), b.twist.parameters()):
        assert torch.equal(p, q)


def test_an_interrupt_inside_an_update_saves_nothing_and_resume_matches(tmp_path, one_thread, capsys):
    """A KeyboardInterrupt that lands inside update 6 (its sampling done, its log line not written; a second
    Ctrl-C, or one where no handler could be installed) checkpoints nothing: resume continues from checkpoint-4 and
    ends where the uninterrupted run ends, log history included."""
    out = tmp_path / "run"

    class Interrupt:
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TwistTrainer(*_kill_resume_setup(str(out), resume=False, max_steps=12), callbacks=[Interrupt()]).train()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert "interrupted inside an update: nothing saved; resume continues from checkpoint-4" in capsys.readouterr().err
    a = TwistTrainer(*_kill_resume_setup(str(tmp_path / "straight"), resume=False, max_steps=12))
    a_state = a.train()
    b = TwistTrainer(*_kill_resume_setup(str(out), resume=True, max_steps=12))
    b_state = b.train()
    assert all(torch.equal(p, q) for p, q in zip(a.twist.parameters(), b.twist.parameters()))
    assert a_state.log_history == b_state.log_history


def test_a_second_ctrl_c_stops_at_once():
    import signal

    from twistlm.interrupts import DeferredInterrupt

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with DeferredInterrupt() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with DeferredInterrupt() as stop:  # an ignored SIGINT (a background job) stays ignored
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
