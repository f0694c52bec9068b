"""Hostile input: each case gets one clear line (a TwistLMError, exit code 2 on the CLI), never a traceback, a hang,
a silent NaN or a wrong answer. Everything here runs on the toy LM or without a model, except the one ``model`` test.
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import twistlm
from twistlm import embedded, memory
from twistlm.cli import run_app
from twistlm.cli import sample as sample_cli
from twistlm.cli.common import write_json
from twistlm.errors import ConfigError, ModelLoadError, PotentialError, TwistLMError
from twistlm.lm import LMState
from twistlm.potentials import FunctionPotential, Sequences
from twistlm.resampling import ess
from twistlm.smc import run_smc
from twistlm.tasks.calculator import apply_calculator
from twistlm.twists import io
from twistlm.twists.base import Twist
from twistlm.twists.tabular import TabularTwist

app_module = importlib.import_module("twistlm.cli.app")  # the module (twistlm.cli.app is the Typer object)

USAGE_ERROR = 2
INTERRUPTED = 130
SUBPROCESS_TIMEOUT_S = 120
FAST_S = 20  # generous on a busy 2-core machine; the bugs took ~50 s (offline hub) or minutes


def _error_line(capsys, argv: list[str]) -> str:
    code = run_app(argv)
    out, err = capsys.readouterr()
    assert code == USAGE_ERROR, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def _no_model(name):
    raise AssertionError("the model must not be loaded for input that can be rejected cheaply")


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(sample_cli, "load_model", _no_model)


@pytest.fixture
def toy_target(toy):
    return twistlm.Target(toy, prompt="ab", max_new_tokens=4)


class ConstantTwist(Twist):
    """log ψ ≡ value (every row, every token), optionally poisoned with ``bad`` from step ``at`` on."""

    name = "constant"

    def __init__(self, vocab: int, value: float = 0.0, bad: float | None = None, at: int = 2, tokens=(1,)):
        super().__init__()
        self.vocab, self.value, self.bad, self.at, self.tokens = vocab, value, bad, at, list(tokens)

    def log_psi(self, ctx):
        out = torch.full((ctx.hidden.shape[0], self.vocab), self.value, dtype=torch.float32)
        if self.bad is not None and ctx.step >= self.at:
            out[:, self.tokens] = self.bad
        return out


class Float32Toy(twistlm.ToyLM):
    """The toy LM with float32 log-probabilities, as a Hugging Face model gives them."""

    def _state(self, h):
        state = super()._state(h)
        return LMState(logprobs=state.logprobs.float(), hidden=state.hidden, backend=state.backend)


# ------------------------------------------------------------------------------------------------ interrupts


def test_keyboard_interrupt_exits_130_with_one_line(capsys, monkeypatch, toy):
    monkeypatch.setattr(sample_cli, "load_model", lambda name: toy)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cli, "run_smc", interrupted)
    assert run_app(["sample", "--model", "toy", "-p", "ab", "-q"]) == INTERRUPTED
    _, err = capsys.readouterr()
    assert err.strip().splitlines() == ["interrupted"], err


@pytest.mark.parametrize("how", ["return", "exit", "abort"])
def test_typer_exit_130_and_abort_from_ctrl_c_are_interrupted(capsys, monkeypatch, how):
    import typer

    def fake_app(args=None, standalone_mode=True):
        if how == "return":
            return INTERRUPTED  # what typer does in non-standalone mode on Ctrl-C
        if how == "exit":
            raise typer.Exit(INTERRUPTED)
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise typer.Abort() from exc

    monkeypatch.setattr(app_module, "app", fake_app)
    assert run_app(["sample"]) == INTERRUPTED
    assert capsys.readouterr().err.strip() == "interrupted"


def test_sigint_during_sampling_exits_130(tmp_path):
    """A real `twistlm sample --model toy` process, interrupted while its sampler loop runs."""
    out = tmp_path / "out.json"
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        # A parent that ignores SIGINT (a background job, some CI runners) passes SIG_IGN on to its children;
        # what is tested here is the CLI's handling of Ctrl-C, so take Python's own SIGINT handler back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import twistlm.cli.sample as s
        real = s.run_smc

        def slow(target, K, callback=None, **kwargs):  # the real sampler, slowed down so the signal lands inside it
            def step(t, T, info):
                if t == 1:  # wait inside the sampler until the signal comes, however loaded the machine is
                    print("sampling", flush=True)
                    time.sleep(60)
            return real(target, K, callback=step, **kwargs)

        s.run_smc = slow
        from twistlm.cli.app import main
        sys.argv = ["twistlm", "sample", "--model", "toy", "-p", "ab", "-T", "100000", "-K", "4", "-q",
                    "--json", {str(out)!r}]
        main()
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "sampling"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == INTERRUPTED, err
    assert err.strip().splitlines() == ["interrupted"], err
    assert not out.exists()


# ------------------------------------------------------------------------------------------- non-finite twists


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("proposal", ["twisted", "base"])
def test_nan_or_inf_twist_names_the_twist_and_step(one_thread, toy_target, bad, proposal):
    V = toy_target.lm.vocab_size
    # Under the base proposal only the sampled token's log ψ enters the weights: poison every token.
    twist = ConstantTwist(V, bad=bad, at=2, tokens=[1] if proposal == "twisted" else range(V))
    with pytest.raises(TwistLMError, match=r"twist ConstantTwist 'constant' returned NaN or \+inf log ψ at step"):
        run_smc(toy_target, 16, proposal=proposal, twist=twist, seed=0)


def test_minus_inf_twist_is_allowed(one_thread, toy_target):
    twist = ConstantTwist(toy_target.lm.vocab_size, bad=-math.inf, at=1)  # ψ = 0 for token 1: never proposed
    (res,) = run_smc(toy_target, 32, proposal="twisted", twist=twist, seed=0)
    assert math.isfinite(res.log_z)
    assert all(1 not in ids for ids in res.token_ids)


def test_huge_log_psi_keeps_the_twisted_proposal_exact(one_thread):
    """log ψ ≡ c is no twist at all (q = p0, Ẑ = Z = 1 for φ ≡ 1); at c = 1e8 float32 rounds log p0 + c to
    multiples of 8, so the normaliser must be computed in float64."""
    lm = Float32Toy(vocab_size=5, hidden_size=8, seed=1)
    target = twistlm.Target(lm, prompt="ab", max_new_tokens=4)
    plain = run_smc(target, 64, proposal="twisted", twist=ConstantTwist(5, 0.0), ess_threshold=0.0, seed=3)[0]
    huge = run_smc(target, 64, proposal="twisted", twist=ConstantTwist(5, 1e8), ess_threshold=0.0, seed=3)[0]
    assert huge.token_ids == plain.token_ids  # the same proposal p0, hence the same draws
    assert abs(huge.log_z) < 1e-6 and huge.ess[-1] == pytest.approx(64)  # all weights 1 once every particle ends


def test_sparkline_survives_nan():
    line = sample_cli._sparkline([4.0, math.nan, 2.0, math.inf], 4)
    assert len(line) == 4


# ----------------------------------------------------------------------------------------- sizes and memory


class _ShortContextToy(twistlm.ToyLM):
    @property
    def max_length(self):
        return 64


def test_infilling_ending_longer_than_context_fails_before_work(capsys, monkeypatch):
    lm = _ShortContextToy(vocab_size=5, hidden_size=8, seed=1)
    monkeypatch.setattr(sample_cli, "load_model", lambda name: lm)
    start = time.perf_counter()
    argv = ["sample", "--model", "toy", "--task", "infilling", "-o", "prompt=ab", "-o", "ending_tokens=100000", "-q"]
    line = _error_line(capsys, argv)
    assert time.perf_counter() - start < FAST_S
    assert "ending of 100000 tokens" in line and "context of 64 tokens" in line


def test_infilling_potential_checks_the_context(toy):
    lm = _ShortContextToy(vocab_size=5, hidden_size=8, seed=1)
    pot = twistlm.potentials.InfillingPotential(lm, observation=[0] * 70)
    with pytest.raises(PotentialError, match="exceeds the model's context of 64"):
        pot(Sequences(prompts=["ab"], texts=["a"], token_ids=[[0]]))


@pytest.mark.parametrize("K", [10**30, 10**400])
def test_absurd_particle_counts_are_refused_not_overflowed(one_thread, toy_target, K):
    with pytest.raises(ConfigError, match=r"need about .* but only .* is available"):
        run_smc(toy_target, K, seed=0)


def test_absurd_particles_on_the_cli(capsys):
    line = _error_line(capsys, ["sample", "--model", "toy", "-p", "ab", "-K", str(10**30), "-q"])
    assert "RAM" in line and "-K" in line


def test_memory_estimate_reads_the_hf_config(monkeypatch):
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          hidden_size=576)
    lm = SimpleNamespace(model=SimpleNamespace(config=cfg, dtype=torch.float32), vocab_size=49152, hidden_size=576,
                         device=torch.device("cpu"))
    assert memory.kv_cache_bytes(lm, 64, 100) == 30 * 2 * 64 * 100 * 3 * 64 * 4
    dev, _ = memory.sampler_bytes(lm, 100_000, 40, 32, memory.BASE_VOCAB_BUFFERS)
    assert dev > 100_000 * 49152 * 4 * memory.BASE_VOCAB_BUFFERS  # ~20 GB per buffer set, plus the KV cache
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 8 * 2**30)
    with pytest.raises(ConfigError, match=r"need about [\d,.]+ GiB but only 8.0 GiB of RAM"):
        memory.check_sampler_memory(lm, 100_000, 40, 32, memory.BASE_VOCAB_BUFFERS)
    memory.check_sampler_memory(lm, 64, 40, 32, memory.BASE_VOCAB_BUFFERS)  # a normal run passes


@pytest.mark.model
def test_huge_k_on_the_embedded_model_is_refused(capsys):
    line = _error_line(capsys, ["sample", "-p", "I bought this", "-K", "100000", "-T", "8", "-q"])
    assert "100000 particles" in line and "GiB" in line


def test_num_particles_true_is_refused(toy_target):
    with pytest.raises(ConfigError, match="num_particles must be a positive integer, got True"):
        run_smc(toy_target, True)


def test_tabular_twist_with_huge_horizon_is_one_line():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="needs more than 5,000,000 entries"):
        TabularTwist(5, 100_000, [4])
    assert time.perf_counter() - start < FAST_S


# -------------------------------------------------------------------------------------------- seeds and prompts


@pytest.mark.parametrize("seed", [2**64, -1, 10**30])
def test_out_of_range_seed(capsys, no_model, seed):
    line = _error_line(capsys, ["sample", "-p", "ab", "--seed", str(seed)])
    assert "--seed must lie in [0, 2^64 − 1]" in line


@pytest.mark.parametrize("seed", [2**64, -1, True])
def test_out_of_range_seed_in_the_api(toy_target, seed):
    with pytest.raises(ConfigError, match="seed must be an integer"):
        run_smc(toy_target, 4, seed=seed)


def test_seed_none_is_fresh_entropy(one_thread, toy_target):
    draws = {tuple(map(tuple, run_smc(toy_target, 32, seed=None)[0].token_ids)) for _ in range(3)}
    assert len(draws) > 1
    fixed = {tuple(map(tuple, run_smc(toy_target, 32, seed=7)[0].token_ids)) for _ in range(2)}
    assert len(fixed) == 1


def test_non_utf8_prompt_file(capsys, no_model, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    line = _error_line(capsys, ["sample", "--prompt-file", str(bad)])
    assert "is not UTF-8 text" in line and str(bad) in line


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_rejected(capsys, no_model, prompt):
    assert "--prompt is empty" in _error_line(capsys, ["sample", "--prompt", prompt])


def test_empty_potential_is_rejected(capsys, no_model):
    assert "the potential is empty" in _error_line(capsys, ["sample", "-p", "ab", "--potential", ""])


def test_model_path_that_is_a_file(capsys, no_model, tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"x")
    assert "is a file, not a model directory" in _error_line(capsys, ["sample", "-p", "ab", "--model", str(weights)])
    with pytest.raises(ModelLoadError, match="is a file, not a model directory"):
        embedded.load_hf(str(weights))


# --------------------------------------------------------------------------------------- models and the cache


def test_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"'no-such-org/no-such-model' is not in the local .* HF_HUB_OFFLINE"):
        embedded.load_hf("no-such-org/no-such-model")
    assert time.perf_counter() - start < FAST_S


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(embedded, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="unreachable: give a local model directory"):
        embedded.load_hf("no-such-org/no-such-model")
    assert time.perf_counter() - start < FAST_S


def test_cache_env_pointing_at_a_file(monkeypatch, tmp_path):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(embedded.CACHE_ENV, str(blocker))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"\$TWISTLM_CACHE = .* is a file, not a directory"):
        embedded.cached_gguf_model(gguf)


def test_corrupted_cached_model_says_how_to_clear_it(monkeypatch, tmp_path):
    import transformers

    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" * 10)
    key = f"m-{gguf.stat().st_size}-tf{transformers.__version__.split('.')[0]}"
    cached = tmp_path / "cache" / "models" / key
    cached.mkdir(parents=True)
    (cached / "twistlm-converted.txt").write_text("converted\n")
    (cached / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match=r"cached model in .* is corrupted or truncated .* rm -r") as info:
        twistlm.load_lm(str(gguf))
    assert str(cached) in str(info.value) and "\n" not in str(info.value)


def test_corrupted_twist_weights(capsys, tmp_path):
    lm = twistlm.ToyLM(vocab_size=5, seed=1)
    directory = tmp_path / "twist"
    twistlm.twists.LinearTwist.for_lm(lm).save_pretrained(directory)
    weights = directory / io.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(ConfigError, match="corrupted or truncated .* retrain the twist or restore the file"):
        io.load_twist(directory, lm)
    argv = ["sample", "--model", "toy", "-p", "ab", "--proposal", "twisted", "--twist", str(directory), "-q"]
    assert "corrupted or truncated" in _error_line(capsys, argv)


# ------------------------------------------------------------------------------------------- potentials, ESS


def test_raising_potential_is_named_with_its_cause():
    def broken(texts):
        return [1 / 0 for _ in texts]

    pot = FunctionPotential(broken, name="broken")
    with pytest.raises(PotentialError, match="potential 'broken' raised ZeroDivisionError: division by zero") as info:
        pot(Sequences(prompts=["p"], texts=["a"], token_ids=[[0]]))
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_ess_of_extreme_log_weights():
    f64 = torch.float64
    assert ess(torch.tensor([[1e308, 1e308, -1e308]], dtype=f64)).tolist() == pytest.approx([2.0])
    assert ess(torch.tensor([[-1e308] * 3], dtype=f64)).tolist() == pytest.approx([3.0])
    assert ess(torch.full((1, 3), -math.inf, dtype=f64)).tolist() == [0.0]


# ------------------------------------------------------------------------------------------ calculator, files


@pytest.mark.parametrize("text", ["1e18 * 10 =", "x2 + 3 =", "2.5e-3 + 1 =", "var_1 * 2 ="])
def test_calculator_does_not_splice_the_tail_of_a_token(text):
    assert apply_calculator(text) == (text, False)


def test_calculator_still_splices_after_a_word():
    assert apply_calculator("Compute 3 + 4 =") == ("Compute 3 + 4 = 7", True)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "out.json"
        write_json(out, {"a": 1})
        twist_dir = tmp_path / "twist"
        twistlm.twists.LinearTwist.for_lm(twistlm.ToyLM(vocab_size=5, seed=1)).save_pretrained(twist_dir)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(out.stat().st_mode) == expected
    assert stat.S_IMODE((twist_dir / io.WEIGHTS_NAME).stat().st_mode) == expected
