"""The ratio twist (twistlm.twists.ratio): log ψ_t = log q_θ(s_1:t) − log p0(s_1:t) with q_θ a LoRA copy.

Exactness on a tiny random Llama: inside SMC (with resampling) its incremental values equal the full-prefix
definition, it is normalised (Σ_v p0 ψ_t = ψ_t−1, so the twisted proposal is q_θ and the intermediate weights are 1),
it is 0 at initialisation; CTL on a cached p0 corpus draws no negatives and drives KL(σ‖q) down by enumeration; it
saves and loads, and refuses a model that is not a Hugging Face one.
"""

from __future__ import annotations

import copy
import math
import os
import signal

import pytest
import torch
from test_training import exact_kl

import twistlm
from twistlm import Target, run_smc
from twistlm.corpus_training import CorpusTwistTrainer
from twistlm.errors import ConfigError
from twistlm.potentials.base import Potential
from twistlm.trainloop import list_checkpoints
from twistlm.training import TwistTrainingConfig
from twistlm.twists.features import prefix_features, prefix_log_psi
from twistlm.twists.io import build_twist, load_twist
from twistlm.twists.ratio import RatioTwist

pytestmark = pytest.mark.usefixtures("one_thread")
LETTER = 5


class HasLetter(Potential):
    """φ(s) = 0.02 + 0.98·1[token 5 in s]."""

    name, bounded = "has-letter", True

    def log_phi(self, seqs):
        return torch.tensor([math.log(0.02 + 0.98 * (LETTER in s)) for s in seqs.token_ids], dtype=torch.float64)


@pytest.fixture(scope="module")
def sharp_hf(tiny_hf):
    """tiny_hf with its final norm's gain × 20: its logits span several nats (the random model's span a fraction of
    one, so no adapter of the frozen-norm copy could move q_θ far from p0)."""
    model = copy.deepcopy(tiny_hf.model)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    return twistlm.HFLM(model, tiny_hf.tokenizer, name="tiny-sharp")


def _adapted(tiny_hf, scale=0.3):
    twist = RatioTwist.for_lm(tiny_hf, r=4, seed=0)
    with torch.no_grad():  # non-zero adapters, so q_θ differs from p0
        for name, p in twist.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return twist


class Recording(twistlm.Twist):
    """Passes the sampler's hooks and calls to ``twist`` and appends (step, tokens, prompt_index, values, hidden) of
    every ``log_psi`` call to ``calls``."""

    def __init__(self, twist, calls):
        super().__init__()
        self.twist, self.calls = twist, calls

    def start(self, target, k):
        self.twist.start(target, k)

    def reorder(self, index):
        self.twist.reorder(index)

    def log_psi(self, ctx):
        out = self.twist.log_psi(ctx)
        self.calls.append((ctx.step, ctx.tokens.clone(), ctx.prompt_index.clone(), out.clone(), ctx.hidden.clone()))
        return out


def test_ratio_twist_is_zero_until_trained(tiny_hf):
    target = Target(tiny_hf, prompts=["ab", "hello"], max_new_tokens=3)
    twist = RatioTwist.for_lm(tiny_hf, r=4, seed=0).bind_target(target)
    feats = prefix_features(tiny_hf, target.prompt_ids, [[4, 5, 6], [7, 8, 9]], prompt_index=[0, 1], max_new_tokens=3)
    with torch.no_grad():
        assert float(prefix_log_psi(twist, feats).abs().max()) < 1e-5


def test_incremental_values_are_the_cumulative_ratio_and_normalised(tiny_hf):
    """In an SMC run, every step's (N, V) values equal the full-prefix definition (a forward of the adapted copy over
    each prefix), and logsumexp_v(log p0(v) + ℓ_t(v)) = ℓ_t−1 of the prefix: the twisted proposal is q_θ. After the
    sampler's reorder hook, the next step appends to the gathered rows and still agrees."""
    twist = _adapted(tiny_hf)
    target = Target(tiny_hf, prompts=["ab", "hello"], max_new_tokens=4)
    calls = []
    run_smc(target, 6, proposal="twisted", twist=Recording(twist, calls), seed=3)
    assert twist.num_rebuilds == 1  # the prompts were encoded once
    for step, tokens, prompt_index, values, hidden in calls:
        seqs = [row + [5] for row in tokens.tolist()]
        feats = prefix_features(tiny_hf, target.prompt_ids, seqs, prompt_index=prompt_index, max_new_tokens=step)
        with torch.no_grad():
            full = prefix_log_psi(twist, feats)
            torch.testing.assert_close(values, full[:, step - 1], atol=1e-4, rtol=1e-4)
            logp0 = torch.log_softmax(tiny_hf.model.lm_head(hidden), dim=-1)
            if step > 1:
                previous = full[:, step - 2].gather(1, tokens[:, -1:]).squeeze(1)
            else:
                previous = torch.zeros(len(values))
            torch.testing.assert_close(torch.logsumexp(logp0 + values, dim=-1), previous, atol=1e-4, rtol=1e-4)
    step, tokens, prompt_index, _, _ = calls[-1]
    index = torch.tensor([1, 1, 0, 3, 2, 5, 7, 7, 6, 9, 11, 10])
    twist.reorder(index)
    new_tokens = torch.cat([tokens[index], torch.arange(12).view(-1, 1) % 7 + 2], dim=1)
    feats = prefix_features(tiny_hf, target.prompt_ids, [r + [5] for r in new_tokens.tolist()],
                            prompt_index=prompt_index[index], max_new_tokens=step + 1)
    ctx = twistlm.TwistContext(feats.hidden[:, step], new_tokens, step + 1, step + 1, prompt_index[index])
    with torch.inference_mode():
        values = twist.log_psi(ctx)
    assert twist.num_rebuilds == 1
    with torch.no_grad():
        torch.testing.assert_close(values, prefix_log_psi(twist, feats)[:, step], atol=1e-4, rtol=1e-4)
    # Out of sequence (no cached parent): the offset is recomputed from the prefix and agrees too.
    twist.start(target, 12)
    with torch.inference_mode():
        again = twist.log_psi(ctx)
    torch.testing.assert_close(again, values, atol=1e-4, rtol=1e-4)


def test_twisted_smc_weights_are_one_until_the_last_step(tiny_hf):
    """The twist is normalised, so base-vs-twisted SMC differ only in the proposal: no resampling is ever triggered
    before the end, and each particle's log weight is log p0(s) φ(s) − log q_θ(s)."""
    twist = _adapted(tiny_hf)
    target = Target(tiny_hf, prompt="ab", potential=HasLetter(), max_new_tokens=4)
    run = run_smc(target, 8, proposal="twisted", twist=twist, ess_threshold=0.99, seed=5)[0]
    assert not run.resampled_at
    seqs = [list(s) for s in run.token_ids]
    feats = prefix_features(tiny_hf, target.prompt_ids, seqs, prompt_index=[0] * 8, max_new_tokens=4)
    twist.bind_target(target)
    with torch.no_grad():
        lpsi = prefix_log_psi(twist, feats)
    lengths = feats.lengths
    at = feats.tokens.unsqueeze(-1)
    last = lpsi.gather(-1, at).squeeze(-1)[torch.arange(8), lengths - 1].double()
    log_phi = torch.tensor([math.log(0.02 + 0.98 * (LETTER in s)) for s in seqs], dtype=torch.float64)
    torch.testing.assert_close(run.log_weights, log_phi - last, atol=1e-4, rtol=1e-4)


def test_ctl_on_a_corpus_fits_the_target_without_negatives(sharp_hf, tmp_path):
    """CTL with the ratio twist is maximum likelihood of q_θ on corpus positives (∝ φ): no negatives are drawn, and
    the enumerated KL(σ‖q) falls well below KL(σ‖p0)."""
    target = Target(sharp_hf, prompt="ab", potential=HasLetter(), max_new_tokens=2)
    twist = build_twist("ratio", sharp_hf, target, r=4, seed=0)
    before = exact_kl(target, twist)
    cfg = TwistTrainingConfig(output_dir=str(tmp_path / "ratio"), loss="ctl", learning_rate=0.003, max_steps=100,
                              num_particles=64, num_positives=64, corpus_size=4096, logging_steps=10**6, save_steps=0,
                              seed=3, plot=False, weight_decay=0.0, corpus_dir=str(tmp_path / "corpus"))
    trainer = CorpusTwistTrainer(twist, target, cfg)
    drawn = []
    original = trainer._draw
    trainer._draw = lambda n, by: drawn.append(by) or original(n, by)
    trainer.train()
    after = exact_kl(target, twist)
    print("KL(σ‖q)", before, "→", after)
    assert set(drawn) == {"sigma"}
    assert before > 0.5 and after < 0.3 * before
    loaded = load_twist(tmp_path / "ratio", sharp_hf)
    assert loaded.config() == twist.config()
    torch.testing.assert_close(exact_kl(target, loaded), after, atol=1e-4, rtol=1e-4)


def test_ratio_twist_needs_a_hugging_face_model():
    with pytest.raises(ConfigError, match="Hugging Face"):
        build_twist("ratio", twistlm.ToyLM(vocab_size=5, seed=1))


def test_on_policy_ctl_trains_on_positives_alone_and_can_start_from_a_saved_twist(sharp_hf, tmp_path):
    """On fresh samples, CTL with the ratio twist needs no negatives (the trainer draws none) and lowers KL(σ‖q);
    ``init_twist`` starts a run from a saved twist's weights (another kind is refused with one line)."""
    from twistlm.training import TwistTrainer

    target = Target(sharp_hf, prompt="ab", potential=HasLetter(), max_new_tokens=2)
    twist = build_twist("ratio", sharp_hf, target, r=4, seed=0)
    before = exact_kl(target, twist)
    base = {"loss": "ctl", "learning_rate": 0.003, "max_steps": 40, "num_particles": 32, "num_positives": 32,
            "positives": "smc", "logging_steps": 10**6, "save_steps": 0, "seed": 3, "plot": False, "weight_decay": 0.0}
    trainer = TwistTrainer(twist, target, TwistTrainingConfig(output_dir=str(tmp_path / "a"), **base))
    trainer._negatives = lambda: pytest.fail("negatives drawn for a normalised twist")
    trainer.train()
    after = exact_kl(target, twist)
    print("KL(σ‖q)", before, "→", after)
    assert after < 0.6 * before
    again = build_twist("ratio", sharp_hf, target, r=4, seed=1)
    cfg = TwistTrainingConfig(output_dir=str(tmp_path / "b"), init_twist=str(tmp_path / "a"), **base)
    TwistTrainer(again, target, cfg)
    torch.testing.assert_close(exact_kl(target, again), after, atol=1e-4, rtol=1e-4)
    other = build_twist("linear", sharp_hf, target)
    with pytest.raises(ConfigError, match="is a 'ratio' twist, not 'linear'"):
        TwistTrainer(other, target, TwistTrainingConfig(output_dir=str(tmp_path / "c"), init_twist=str(tmp_path / "a"),
                                                        **base))


def test_buffer_positives_still_get_their_negatives_with_a_normalised_twist(sharp_hf, tmp_path):
    """A replay buffer is filled from the negatives, so with it the trainer keeps sampling them."""
    from twistlm.training import TwistTrainer

    target = Target(sharp_hf, prompt="ab", potential=HasLetter(), max_new_tokens=2)
    twist = build_twist("ratio", sharp_hf, target, r=4, seed=0)
    cfg = TwistTrainingConfig(output_dir=str(tmp_path / "buf"), loss="ctl", learning_rate=0.003, max_steps=2,
                              num_particles=8, positives="buffer", logging_steps=10**6, save_steps=0, plot=False)
    trainer = TwistTrainer(twist, target, cfg)
    assert trainer.needs_negatives
    trainer.train()
    assert sum(len(e) for e in trainer.positive_source.entries) > 0


def test_jeffreys_differentiates_the_copys_own_log_probability_and_lowers_both_kls(sharp_hf, tmp_path):
    """With the ratio twist, log q_θ(s) of the Jeffreys loss (Σ_t lp0 + ℓ_t − log Σ_v p0 ψ_t, with grad) is the
    adapted copy's own log-probability of s; trained on its own samples, the twist lowers KL(σ‖q) by enumeration."""
    from twistlm.losses import make_rollouts
    from twistlm.training import TwistTrainer

    target = Target(sharp_hf, prompt="ab", potential=HasLetter(), max_new_tokens=2)
    twist = _adapted(sharp_hf)
    seqs = [[3, 5], [5, 7], [7, 8]]
    feats = prefix_features(sharp_hf, target.prompt_ids, seqs, prompt_index=[0] * 3, max_new_tokens=2)
    r = make_rollouts(feats, prefix_log_psi(twist, feats), torch.zeros(3), 1, proposal="twisted",
                      differentiable_q=True)
    with torch.no_grad():
        copy_logp = torch.log_softmax(twist.peft(torch.tensor([target.prompt_ids[0] + s for s in seqs])).logits
                                      .float(), dim=-1)
    n = len(target.prompt_ids[0])
    direct = [float(copy_logp[i, n - 1, s[0]] + copy_logp[i, n, s[1]]) for i, s in enumerate(seqs)]
    torch.testing.assert_close(r.log_q_seq[0].detach(), torch.tensor(direct, dtype=torch.float64), atol=1e-4, rtol=0)
    assert r.log_q_seq.requires_grad

    fresh = build_twist("ratio", sharp_hf, target, r=4, seed=0)
    before = exact_kl(target, fresh)
    cfg = TwistTrainingConfig(output_dir=str(tmp_path / "jef"), loss="jeffreys", learning_rate=0.003, max_steps=40,
                              num_particles=64, logging_steps=10**6, save_steps=0, seed=3, plot=False, weight_decay=0.0)
    TwistTrainer(fresh, target, cfg).train()
    after = exact_kl(target, fresh)
    print("KL(σ‖q)", before, "→", after)
    assert after < 0.6 * before


class _CtrlC:
    """Ctrl-C landing inside update ``at`` (after its sampling, before its log line), as from a terminal."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_inside_a_jeffreys_ratio_twist_update_resumes_to_the_uninterrupted_run(sharp_hf, tmp_path, capsys):
    """On-policy from the LoRA copy it trains (the sentiment recipe's kind and loss): Ctrl-C inside update 4 of 6
    lets it finish and checkpoint, and the resumed run's adapters and log history are the uninterrupted run's,
    bitwise."""
    from twistlm.interrupts import STOP_MESSAGE
    from twistlm.training import TwistTrainer

    target = Target(sharp_hf, prompt="ab", potential=HasLetter(), max_new_tokens=2)

    def run(out, resume=False, callbacks=()):
        twist = build_twist("ratio", sharp_hf, target, r=4, seed=0)
        cfg = TwistTrainingConfig(output_dir=str(out), loss="jeffreys", learning_rate=0.003, max_steps=6,
                                  num_particles=16, logging_steps=1, save_steps=3, seed=3, plot=False,
                                  weight_decay=0.0, resume=resume)
        state = TwistTrainer(twist, target, cfg, callbacks=list(callbacks)).train()
        return twist, state

    straight, straight_state = run(tmp_path / "straight")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background parent may pass SIG_IGN
    try:
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "split", callbacks=[_CtrlC(4)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert STOP_MESSAGE in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["checkpoint-3", "checkpoint-4"]
    resumed, resumed_state = run(tmp_path / "split", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    assert [h["step"] for h in resumed_state.log_history] == [1, 2, 3, 4, 5, 6]
    assert resumed_state.log_history == straight_state.log_history
