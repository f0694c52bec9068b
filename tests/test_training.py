"""TwistTrainer, its config, checkpoints (kill and resume), the ``train-twist`` CLI, and the twist kinds' I/O.

Everything runs on the toy LM, except the LoRA twist's tests, which use a tiny randomly initialised Llama built from
a config (no hub access) with a character tokenizer stub.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import twistlm
from twistlm import LinearTwist, Target, TwistContext, enumerate_target, run_smc
from twistlm.cli import common, run_app
from twistlm.errors import ConfigError, TwistLMError
from twistlm.potentials.base import Potential
from twistlm.tasks.registry import TASKS, Task
from twistlm.training import TwistTrainer, TwistTrainingConfig, list_checkpoints
from twistlm.twists.conditional import ConditionalTwist
from twistlm.twists.features import prefix_features, prefix_log_psi
from twistlm.twists.io import build_twist, load_twist, save_twist
from twistlm.twists.mlp import MLPTwist
from twistlm.twists.tabular import TabularTwist

HERE = Path(__file__).resolve().parent
SAMPLER_HOOKS = hasattr(twistlm.Twist, "start")
"""Whether the samplers call the twist hooks ``start`` / ``reorder`` (proposed for smc.py / twists/base.py)."""
USAGE_ERROR = 2

pytestmark = pytest.mark.usefixtures("one_thread")


class SoftLetter(Potential):
    """φ(s) = 0.02 + 0.98·1[letter in s], the letter given per prompt by extras["label"] (0 → 'b', 1 → 'c')."""

    name = "soft-letter"
    bounded = True

    def log_phi(self, seqs):
        labels = seqs.extras.get("label", [0] * len(seqs))
        return torch.tensor(
            [math.log(0.02 + 0.98 * ((1 + lab) in ids)) for ids, lab in zip(seqs.token_ids, labels)],
            dtype=torch.float64,
        )


class Unbounded(Potential):
    name = "unbounded-length"

    def log_phi(self, seqs):
        return torch.tensor([0.3 * len(ids) for ids in seqs.token_ids], dtype=torch.float64)


@pytest.fixture(scope="module")
def lm():
    return twistlm.ToyLM(vocab_size=5, seed=1)


@pytest.fixture(scope="module")
def target(lm):
    return Target(lm, prompt="a", potential=SoftLetter(), max_new_tokens=3)


def exact_kl(target: Target, twist, prompt: int = 0) -> float:
    """KL(σ‖q) for one prompt of ``target``, by enumeration and K = 1 clamped runs (see tests/test_losses.py)."""
    exact = enumerate_target(target, prompt)
    seqs = [list(s) for s in exact.sequences]
    extras = {k: [v[prompt]] * len(seqs) for k, v in target.extras.items()}
    groups = Target(
        target.lm,
        prompts=[target.prompts[prompt]] * len(seqs),
        potential=target.potential,
        max_new_tokens=target.max_new_tokens,
        extras=extras,
    )
    if hasattr(twist, "bind_target"):
        twist.bind_target(groups)
    results = run_smc(groups, 1, proposal="twisted", twist=twist, ess_threshold=0.0, reference=seqs)
    if hasattr(twist, "bind_target"):
        twist.bind_target(target)
    log_q = exact.log_p0 + exact.log_phi - torch.stack([r.log_weights[0] for r in results])
    sigma = exact.probs
    terms = torch.where(sigma > 0, sigma * (sigma.log() - log_q), 0.0)  # σ = 0 sequences (φ = 0) contribute 0
    return float(terms.sum())


# ------------------------------------------------------------------------------------------------ config


def test_hf_argument_parser_parses_the_config():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(TwistTrainingConfig).parse_args_into_dataclasses(
        [
            "--loss",
            "rl",
            "--learning_rate",
            "0.05",
            "--max_steps",
            "7",
            "--num_particles",
            "8",
            "--proposal",
            "base",
            "--positives",
            "exact",
            "--output_dir",
            "somewhere",
            "--resume",
            "--seed",
            "3",
            "--save_steps",
            "2",
        ]
    )
    assert (cfg.loss, cfg.learning_rate, cfg.max_steps, cfg.num_particles) == ("rl", 0.05, 7, 8)
    assert (cfg.proposal, cfg.positives, cfg.output_dir, cfg.resume, cfg.seed) == (
        "base",
        "exact",
        "somewhere",
        True,
        3,
    )
    assert cfg.negative_proposal == "base" and cfg.positives_per_prompt == 8
    assert TwistTrainingConfig(loss="sixo").negative_proposal == "base"
    assert TwistTrainingConfig(loss="ctl").negative_proposal == "twisted"
    with pytest.raises(ConfigError, match="unknown twist loss 'nope'"):
        HfArgumentParser(TwistTrainingConfig).parse_args_into_dataclasses(["--loss", "nope"])
    with pytest.raises(ConfigError, match="positives source"):
        TwistTrainingConfig(positives="oracle")
    with pytest.raises(ConfigError, match="proposal"):
        TwistTrainingConfig(proposal="uniform")


# ------------------------------------------------------------------------------------------------ trainer


def test_trainer_runs_logs_saves_and_loads(tmp_path, lm, target):
    from transformers import TrainerCallback

    events = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            events.append(("begin", state.global_step))

        def on_log(self, args, state, control, logs=None, **kw):
            events.append(("log", logs["step"]))

        def on_save(self, args, state, control, **kw):
            events.append(("save", state.global_step))

        def on_train_end(self, args, state, control, **kw):
            events.append(("end", state.global_step))

    twist = TabularTwist.for_target(target, init_scale=1.0, seed=0)
    before = exact_kl(target, twist)
    cfg = TwistTrainingConfig(
        output_dir=str(tmp_path / "run"),
        loss="rl",
        learning_rate=0.2,
        max_steps=40,
        num_particles=32,
        logging_steps=10,
        save_steps=20,
        save_total_limit=1,
    )
    state = TwistTrainer(twist, target, cfg, callbacks=[Recorder()], run_info={"task": "toy-letter"}).train()
    assert state.global_step == 40
    assert events == [
        ("begin", 0),
        ("log", 10),
        ("log", 20),
        ("save", 20),
        ("log", 30),
        ("log", 40),
        ("save", 40),
        ("end", 40),
    ]
    assert [h["step"] for h in state.log_history] == [10, 20, 30, 40]
    for h in state.log_history:
        assert set(h) >= {"loss", "log_z", "ess", "mean_reward", "learning_rate"}
        assert math.isfinite(h["loss"]) and 0 < h["ess"] <= 1 and 0 < h["mean_reward"] <= 1
    exact = enumerate_target(target)
    assert state.log_history[-1]["log_z"] == pytest.approx(exact.log_z, abs=0.3)
    after = exact_kl(target, twist)
    assert after < before / 3

    out = tmp_path / "run"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-40"]  # save_total_limit=1 removed checkpoint-20
    ckpt = out / "checkpoint-40"
    for name in (
        "model/twist.safetensors",
        "model/twist_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.safetensors",
        "rng_state_0.json",
        "trainer_state.json",
    ):
        assert (ckpt / name).is_file(), name
    for name in (
        "twist.safetensors",
        "twist_config.json",
        "training_config.json",
        "log_history.json",
        "training_curve.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "twist_config.json").read_text())
    assert config["kind"] == "tabular" and config["base_model"] == "toy" and config["task"] == "toy-letter"

    loaded = load_twist(out, lm)
    assert torch.equal(loaded.table, twist.table)
    assert exact_kl(target, loaded) == pytest.approx(after, abs=1e-12)


def test_callbacks_can_stop_training(target, capsys):
    from transformers import PrinterCallback, TrainerCallback

    class StopAt5(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step == 5
            return control

    twist = TabularTwist.for_target(target)
    cfg = TwistTrainingConfig(
        output_dir="unused", loss="rl", max_steps=50, num_particles=4, logging_steps=5, save_steps=0, plot=False
    )
    trainer = TwistTrainer(twist, target, cfg, callbacks=[StopAt5(), PrinterCallback()])
    trainer.save_outputs = lambda: None  # nothing to write for this test
    assert trainer.train().global_step == 5
    assert "'step': 5" in capsys.readouterr().out  # Hugging Face's PrinterCallback printed the log


def _kill_resume_setup(out: str, resume: bool, max_steps: int = 12, positives: str = "smc", loss: str = "ctl"):
    """The run of the kill-and-resume test (also imported by its subprocess)."""
    torch.set_num_threads(1)
    lm = twistlm.ToyLM(vocab_size=5, seed=1)
    target = Target(lm, prompts=["a", "b"], potential=SoftLetter(), max_new_tokens=3, extras={"label": [0, 1]})
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=0, per_prompt=True)
    cfg = TwistTrainingConfig(
        output_dir=out,
        loss=loss,
        proposal="twisted" if loss == "jeffreys" else None,
        learning_rate=0.1,
        max_steps=max_steps,
        num_particles=8,
        positives=positives,
        seed=7,
        logging_steps=2,
        save_steps=4,
        save_total_limit=2,
        resume=resume,
        lr_scheduler_type="linear",
        plot=False,
    )
    return twist, target, cfg


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {here!r})
from test_training import _kill_resume_setup
from twistlm.training import TwistTrainer

class KillAfterSave:
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == {kill_at}:
            print("checkpoint", state.global_step, "written; killing", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

twist, target, cfg = _kill_resume_setup({out!r}, resume=False, positives={positives!r}, loss={loss!r})
TwistTrainer(twist, target, cfg, callbacks=[KillAfterSave()]).train()
print("not killed", flush=True)
"""


@pytest.mark.parametrize(("positives", "loss"), [("smc", "ctl"), ("buffer", "ctl"), ("smc", "jeffreys")])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, positives, loss):
    """A training subprocess SIGKILLed right after writing checkpoint 8 of 12, then resumed, ends with exactly the
    parameters (and log history) of an uninterrupted run with the same seed (the replay buffer's contents are part
    of the checkpoint; the Jeffreys run samples from the twisted proposal it trains)."""
    killed = tmp_path / "killed"
    script = KILL_SCRIPT.format(here=str(HERE), kill_at=8, out=str(killed), positives=positives, loss=loss)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "killing" in proc.stdout and "not killed" not in proc.stdout
    assert [p.name for p in list_checkpoints(killed)] == ["checkpoint-4", "checkpoint-8"]
    assert not (killed / "twist_config.json").exists()  # it never reached the end
    # Debris of a run killed while writing: a temporary folder and a checkpoint folder without its state file.
    (killed / ".tmp-checkpoint-12-4242").mkdir()
    (killed / ".tmp-checkpoint-12-4242" / "optimizer.pt").write_bytes(b"garbage")
    (killed / "checkpoint-99").mkdir()

    twist, target, cfg = _kill_resume_setup(str(killed), resume=True, positives=positives, loss=loss)
    state = TwistTrainer(twist, target, cfg).train()
    assert state.global_step == 12
    assert not (killed / ".tmp-checkpoint-12-4242").exists()

    ref_twist, ref_target, ref_cfg = _kill_resume_setup(str(tmp_path / "ref"), resume=False, positives=positives,
                                                        loss=loss)
    ref_state = TwistTrainer(ref_twist, ref_target, ref_cfg).train()
    assert torch.equal(twist.table, ref_twist.table)  # bitwise
    assert [h["step"] for h in state.log_history] == [2, 4, 6, 8, 10, 12]
    assert state.log_history == ref_state.log_history


def test_resume_refuses_changed_settings(tmp_path):
    twist, target, cfg = _kill_resume_setup(str(tmp_path), resume=False, max_steps=4)
    TwistTrainer(twist, target, cfg).train()
    twist, target, cfg = _kill_resume_setup(str(tmp_path), resume=True, max_steps=6)
    cfg.learning_rate = 0.5
    with pytest.raises(ConfigError, match="learning_rate"):
        TwistTrainer(twist, target, cfg).train()


def test_resume_without_checkpoint_starts_fresh(tmp_path, target):
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=0)
    cfg = TwistTrainingConfig(
        output_dir=str(tmp_path / "new"), loss="rl", max_steps=3, num_particles=4, resume=True, save_steps=0, plot=False
    )
    assert TwistTrainer(twist, target, cfg).train().global_step == 3


# ------------------------------------------------------------------------------------------------ twist kinds


def test_conditional_twist_learns_per_prompt_conditions(lm):
    """One head, two prompts that differ only by their label: each prompt's proposal approaches its own σ."""
    target = Target(lm, prompts=["a", "a"], potential=SoftLetter(), max_new_tokens=3, extras={"label": [0, 1]})
    twist = build_twist("conditional", lm, target, width=128, depth=2, dtype="float64")
    assert twist.condition == "label" and twist.conditions.tolist() == [0, 1]
    before = [exact_kl(target, twist, b) for b in range(2)]
    cfg = TwistTrainingConfig(
        output_dir="unused",
        loss="ctl",
        learning_rate=0.01,
        max_steps=300,
        num_particles=32,
        positives="exact",
        lr_scheduler_type="linear",
        logging_steps=10**6,
        save_steps=0,
    )
    trainer = TwistTrainer(twist, target, cfg)
    for _ in range(cfg.max_steps):
        trainer.training_step()
    after = [exact_kl(target, twist, b) for b in range(2)]
    print("conditional KL", before, "→", after)
    assert max(after) < 0.05 and all(a < b / 10 for a, b in zip(after, before))


def test_conditional_twist_token_condition_and_errors(lm, tmp_path):
    target = Target(
        lm, prompts=["a", "b"], potential=SoftLetter(), max_new_tokens=3, extras={"observation": ["cd", "b"]}
    )
    twist = ConditionalTwist.for_target(target, width=16, init_scale=0.5)
    assert twist.condition == "tokens" and twist.conditions.tolist() == [[2, 3] + [5] * 6, [1] + [5] * 7]
    result = run_smc(target, 4, proposal="twisted", twist=twist, seed=0)
    assert len(result) == 2
    save_twist(twist, tmp_path / "c", lm.name)
    loaded = load_twist(tmp_path / "c", lm)
    if SAMPLER_HOOKS:  # the sampler's start hook reads the conditions from target.extras
        run_smc(target, 4, proposal="twisted", twist=loaded, seed=0)
    else:
        with pytest.raises(TwistLMError, match="no conditions"):
            run_smc(target, 4, proposal="twisted", twist=loaded, seed=0)
        loaded.bind_target(target)
    torch.testing.assert_close(_psi(loaded, target), _psi(twist, target))
    with pytest.raises(ConfigError, match="extras"):
        ConditionalTwist.for_target(Target(lm, prompt="a", max_new_tokens=2))


def _psi(twist, target):
    seqs = [[0, 1, 4], [2, 4], [3, 3, 3]]
    last = target.num_prompts - 1
    feats = prefix_features(
        target.lm, target.prompt_ids, seqs, prompt_index=[0, last, last], max_new_tokens=target.max_new_tokens
    )
    with torch.no_grad():
        return prefix_log_psi(twist, feats)


@pytest.mark.parametrize("kind", ["linear", "mlp", "embedding", "tabular"])
def test_save_load_roundtrip(kind, lm, target, tmp_path):
    twist = build_twist(kind, lm, target, init_scale=0.5, seed=1)
    save_twist(twist, tmp_path / kind, lm.name, task="toy-letter")
    loaded = load_twist(tmp_path / kind, lm)
    assert type(loaded) is type(twist)
    torch.testing.assert_close(_psi(loaded, target), _psi(twist, target))
    assert common.load_twist(tmp_path / kind, lm) is not None  # `twistlm sample --twist DIR` can load it too


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_unsampled_tokens_follow_the_shared_level(kind, lm):
    """Regressing only token 0's value on −3 moves every token the loss never saw to the shared level (so q ∝ p0 ψ
    does not favour them); without the level (old checkpoints) they would stay at log ψ = 0."""
    torch.manual_seed(0)
    hidden = torch.randn(16, lm.hidden_size, dtype=torch.float64)
    variants = [(True, build_twist(kind, lm, None, seed=0)), (False, build_twist(kind, lm, None, seed=0, level=False))]
    for has_level, twist in variants:
        twist = twist.double()
        opt = torch.optim.Adam(twist.parameters(), lr=0.05)
        for _ in range(200):
            out = twist.log_psi(TwistContext(hidden, None, 1, 1, None))
            loss = (out[:, 0] + 3.0).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out = twist.log_psi(TwistContext(hidden, None, 1, 1, None)).detach()
        assert out[:, 0].mean() == pytest.approx(-3.0, abs=0.1)
        others = out[:, 1:]
        if has_level:
            assert others.mean() < -1.0, kind  # moved with the level
        else:
            assert torch.all(others.abs() < 1e-12), kind  # never-seen rows keep ψ = 1


def test_checkpoints_without_level_load_as_before(lm, tmp_path):
    twist = build_twist("mlp", lm, None, seed=0, level=False, init_scale=0.3)
    save_twist(twist, tmp_path, lm.name)
    cfg_path = tmp_path / "twist_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["level"]  # written before the shared level existed
    cfg_path.write_text(json.dumps(cfg))
    again = load_twist(tmp_path, lm)
    assert again.out.level is None


def test_linear_twist_keeps_its_format(lm, target, tmp_path):
    twist = LinearTwist.for_lm(lm, init_scale=0.3, seed=2)
    save_twist(twist, tmp_path, "toy")
    again = LinearTwist.from_pretrained(tmp_path, lm)  # the original loader reads what save_twist wrote
    torch.testing.assert_close(again.head.weight, twist.head.weight)


def test_load_refuses_other_model_or_vocabulary(lm, target, tmp_path):
    twist = MLPTwist.for_lm(lm, width=8)
    save_twist(twist, tmp_path, lm.name)
    with pytest.raises(ConfigError, match="vocabulary size 5.*has 6 tokens"):
        load_twist(tmp_path, twistlm.ToyLM(vocab_size=6, seed=1))
    with pytest.raises(ConfigError, match="hidden size 8.*hidden size 4"):
        load_twist(tmp_path, twistlm.ToyLM(vocab_size=5, hidden_size=4, seed=1))
    save_twist(twist, tmp_path, "some/other-model")
    with pytest.raises(ConfigError, match="trained for base model 'some/other-model', not for 'toy'"):
        load_twist(tmp_path, lm)
    assert load_twist(tmp_path, lm, allow_other_model=True) is not None
    with pytest.raises(ConfigError, match="unknown twist kind 'spline'"):
        (tmp_path / "twist_config.json").write_text(json.dumps({"kind": "spline", "vocab_size": 5}))
        load_twist(tmp_path, lm)
    with pytest.raises(ConfigError, match="no twist found"):
        load_twist(tmp_path / "missing", lm)


# ------------------------------------------------------------------------------------------------ LoRA twist


class CharTokenizer:
    """Enough of a tokenizer for HFLM: ids 0 = EOS, 1 = BOS, 2.. = letters."""

    eos_token_id, bos_token_id, chat_template = 0, 1, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [2 + (ord(c) - 97) % 30 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i - 2) for i in ids if i >= 2)


def test_hf_prefix_features_match_the_incremental_lm(tiny_hf):
    """One forward pass over [left-padded prompt; s_1..s_T−1] gives the hidden states and log p0 that HFLM's
    KV-cached prefill/step produce before each token (prompts of different lengths: the padded path)."""
    target = Target(tiny_hf, prompts=["ab", "hello"], max_new_tokens=4)
    seqs = [[5, 6, 7, 8], [9, 0], [3, 3, 3, 3], [0]]
    index = [0, 0, 1, 1]
    hidden, logp0, mask = prefix_features(tiny_hf, target.prompt_ids, seqs, prompt_index=index, max_new_tokens=4)
    assert mask.tolist() == [[True] * 4, [True, True, False, False], [True] * 4, [True, False, False, False]]
    state = tiny_hf.reorder(tiny_hf.prefill(target.prompt_ids, 1), torch.tensor(index))
    tokens = torch.tensor([s + [0] * (4 - len(s)) for s in seqs])
    for t in range(4):
        torch.testing.assert_close(hidden[:, t], state.hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logp0[:, t], state.logprobs, atol=1e-5, rtol=1e-5)
        state = tiny_hf.step(state, tokens[:, t])


def _lora(tiny_hf):
    from twistlm.twists.lora import LoRATwist

    twist = LoRATwist.for_lm(tiny_hf, r=4, init_scale=0.1, seed=0)
    with torch.no_grad():  # non-zero adapters, so the adapted copy differs from the base model
        for name, p in twist.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return twist


def test_lora_twist_incremental_state_matches_full_forward(tiny_hf):
    """Inside an unchanged SMC loop that resamples every step, the LoRA twist's KV-cached values equal a full
    forward pass of the adapted copy over each prefix; the prompts are encoded once per run."""
    twist = _lora(tiny_hf)
    target = Target(tiny_hf, prompts=["ab", "hello"], max_new_tokens=5)
    calls = []

    class Recorder(twistlm.Twist):
        def log_psi(self, ctx):
            out = twist.log_psi(ctx)
            calls.append((ctx.step, ctx.tokens.clone(), ctx.prompt_index.clone(), out.clone()))
            return out

    if SAMPLER_HOOKS:  # the sampler's start hook hands the twist its prompts
        run_smc(target, 6, proposal="twisted", twist=_lora(tiny_hf), seed=3)
    else:
        with pytest.raises(TwistLMError, match="bind_target"):
            run_smc(target, 6, proposal="twisted", twist=_lora(tiny_hf), seed=3)
    twist.start(target, 6)  # the proposed sampler hook (what bind_target does)
    rebuilds = twist.num_rebuilds
    result = run_smc(target, 6, proposal="twisted", twist=Recorder(), ess_threshold=1.0, seed=3)
    assert result[0].resampled_at  # resampling happened: rows were gathered by ancestor
    assert twist.num_rebuilds == rebuilds + 1
    for step, tokens, prompt_index, values in calls:
        seqs = [row + [5] for row in tokens.tolist()]
        feats = prefix_features(tiny_hf, target.prompt_ids, seqs, prompt_index=prompt_index, max_new_tokens=step)
        with torch.no_grad():
            full = prefix_log_psi(twist, feats)[:, step - 1]
        torch.testing.assert_close(values, full, atol=1e-5, rtol=1e-5)
    # The proposed sampler hook `reorder(index)` gathers the cache by ancestor; the next step then appends one token
    # to each row (no re-encoding) and still agrees with a full forward pass.
    step, tokens, prompt_index, _ = calls[-1]
    index = torch.tensor([1, 1, 0, 3, 2, 5, 7, 7, 6, 9, 11, 10])
    old_hidden, old_keys = twist._state.hidden.clone(), list(twist._keys)
    twist.reorder(index)
    assert torch.equal(twist._state.hidden, old_hidden[index]) and twist._keys == [old_keys[i] for i in index]
    new_tokens = torch.cat([tokens[index], torch.arange(12).view(-1, 1) % 7 + 2], dim=1)
    ctx = twistlm.TwistContext(torch.zeros(12, 16), new_tokens, step + 1, step + 1, prompt_index[index])
    with torch.inference_mode():
        values = twist.log_psi(ctx)
    assert twist.num_rebuilds == rebuilds + 1
    feats = prefix_features(
        tiny_hf,
        target.prompt_ids,
        [row + [5] for row in new_tokens.tolist()],
        prompt_index=prompt_index[index],
        max_new_tokens=step + 1,
    )
    with torch.no_grad():
        torch.testing.assert_close(values, prefix_log_psi(twist, feats)[:, step], atol=1e-5, rtol=1e-5)


def test_lora_twist_trains_saves_and_loads(tiny_hf, tmp_path):
    class EndsWithB(Potential):
        name, bounded = "ends-b", True

        def log_phi(self, seqs):
            return torch.tensor([0.0 if t.endswith("b") else -2.0 for t in seqs.texts], dtype=torch.float64)

    target = Target(tiny_hf, prompt="ab", potential=EndsWithB(), max_new_tokens=3)
    twist = build_twist("lora", tiny_hf, target, r=4, seed=0)
    frozen = {n: p.clone() for n, p in twist.named_parameters() if not p.requires_grad}
    trainable = {n: p.clone() for n, p in twist.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and "head.token.weight" in trainable
    cfg = TwistTrainingConfig(
        output_dir=str(tmp_path / "lora"),
        loss="rl",
        learning_rate=0.01,
        max_steps=3,
        num_particles=4,
        save_steps=0,
        plot=False,
    )
    TwistTrainer(twist, target, cfg).train()
    assert all(torch.equal(p, frozen[n]) for n, p in twist.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, trainable[n]) for n, p in twist.named_parameters() if "lora_B" in n)
    saved = json.loads((tmp_path / "lora" / "twist_config.json").read_text())
    assert saved["kind"] == "lora" and saved["base_model"] == "tiny-llama"
    loaded = load_twist(tmp_path / "lora", tiny_hf)
    loaded.bind_target(target)
    twist.bind_target(target)
    a = run_smc(target, 4, proposal="twisted", twist=twist, seed=1)[0]
    b = run_smc(target, 4, proposal="twisted", twist=loaded, seed=1)[0]
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(a.log_weights, b.log_weights)


def test_lora_twist_needs_a_hugging_face_model(lm, target):
    with pytest.raises(ConfigError, match="Hugging Face"):
        build_twist("lora", lm, target)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def toy_task(monkeypatch):
    """Task ``toy-letter``: prompt "a", φ = 0.02 + 0.98·1[letter in s] (bounded), horizon 3 by default."""

    def build(lm, max_new_tokens=None, num_prompts=1, letter=0):
        return Target(
            lm, prompt="a", potential=SoftLetter(), max_new_tokens=max_new_tokens or 3, extras={"label": [letter]}
        )

    def build_unbounded(lm, max_new_tokens=None, num_prompts=1):
        return Target(lm, prompt="a", potential=Unbounded(), max_new_tokens=max_new_tokens or 3)

    monkeypatch.setitem(TASKS, "toy-letter", Task("toy-letter", "test task", build, options={"letter": "0 or 1"}))
    monkeypatch.setitem(TASKS, "toy-long", Task("toy-long", "unbounded φ", build_unbounded))


def test_cli_train_twist_end_to_end(tmp_path, toy_task, capsys):
    out = tmp_path / "cli"
    argv = [
        "train-twist",
        "--task",
        "toy-letter",
        "-o",
        "letter=1",
        "--model",
        "toy",
        "--loss",
        "ctl",
        "--twist-kind",
        "tabular",
        "--twist-option",
        "init_scale=1.0",
        "--steps",
        "60",
        "--particles",
        "32",
        "--positives",
        "exact",
        "--lr",
        "0.2",
        "--out",
        str(out),
        "--save-steps",
        "30",
        "--logging-steps",
        "20",
        "-t",
        "max_grad_norm=5",
        "-t",
        "lr_scheduler_type=linear",
    ]
    assert run_app(argv) == 0, capsys.readouterr().err
    assert "trained tabular twist with ctl for 60 steps" in capsys.readouterr().out
    for name in (
        "twist.safetensors",
        "twist_config.json",
        "training_config.json",
        "training_curve.png",
        "log_history.json",
        "checkpoint-60/trainer_state.json",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "training_config.json").read_text())
    assert config["task"] == "toy-letter" and config["task_options"] == {"letter": 1} and config["loss"] == "ctl"
    assert config["model"] == "toy" and config["twist_kind"] == "tabular" and config["max_steps"] == 60
    assert config["max_grad_norm"] == 5.0 and config["lr_scheduler_type"] == "linear"

    lm = twistlm.ToyLM(vocab_size=5, seed=1)
    twist = load_twist(out, lm)
    target = TASKS["toy-letter"].build(lm, letter=1)
    result = run_smc(target, 64, proposal="twisted", twist=twist, seed=0)[0]
    exact = enumerate_target(target)
    assert result.log_z == pytest.approx(exact.log_z, abs=0.15)
    assert exact_kl(target, twist) < 0.2 < exact_kl(target, TabularTwist.for_target(target))

    # Resuming a finished run does no further steps and rewrites the same twist.
    assert run_app(argv + ["--resume", "-q"]) == 0
    assert torch.equal(load_twist(out, lm).table, twist.table)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "toy-letter", "--loss", "kl"], "unknown twist loss 'kl'"),
        (["--task", "no-such-task"], "unknown task 'no-such-task'"),
        (["--task", "toy-letter", "--twist-kind", "spline"], "unknown twist kind 'spline'"),
        (["--task", "toy-letter", "-o", "colour=red"], "has no option 'colour'"),
        (
            ["--task", "toy-long", "--loss", "fudge", "--twist-kind", "tabular"],
            "fudge loss needs a potential with 0 ≤ φ ≤ 1",
        ),
        (["--task", "toy-letter", "--loss", "fudge", "--twist-kind", "linear"], "no sigmoid output"),
        (["--task", "toy-letter", "--positives", "oracle"], "unknown positives source"),
        (["--task", "toy-letter", "-t", "momentum=0.9"], "unknown --train-option 'momentum'; choose from: adam_beta1"),
        (["--task", "toy-letter", "-t", "loss=rl"], "use its own flag"),
        (["--task", "toy-letter", "-t", "max_grad_norm=big"], "max_grad_norm='big': expected float"),
    ],
)
def test_cli_train_twist_bad_input(tmp_path, toy_task, capsys, extra, message):
    code = run_app(["train-twist", "--model", "toy", "--out", str(tmp_path / "x"), "--steps", "2", *extra])
    assert code == USAGE_ERROR
    assert message in capsys.readouterr().err.replace("\n", " ")
