"""The observation-conditioned ratio twist of infilling and its training data (twistlm.twists.adapted's ``condition``,
the ``observed`` positives, dataset-mode training over BDMC problems, the infilling recipe).

Exactness on a tiny random Llama: a ratio twist reading o is log q_θ(s_1:t | o, x) − log p0(s_1:t | x) — inside SMC
its incremental values equal that full-prefix definition, also when a state is rebuilt out of sequence, and it is
normalised against p0 of the target's own prompt, so twisted SMC stays exact; observed positives are each prompt's BDMC
sample; CTL on BDMC pairs (maximum likelihood of q_θ(s | o) on joint p0 draws) lowers the enumerated KL(σ_o‖q) on
endings it never saw; the twist saves and loads with what it reads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_ratio_twist import Recording
from test_training import exact_kl, run_app, toy_task  # noqa: F401 (toy_task: a fixture)

import twistlm
from twistlm import Target, run_smc
from twistlm.bdmc import EXACT_SAMPLE_KEY
from twistlm.cli import prompt_batches
from twistlm.conditioning import ObservationFirst
from twistlm.errors import ConfigError
from twistlm.positives import PositiveRequest, get_positive_source
from twistlm.recipes import twist_recipe
from twistlm.tasks.registry import get_task
from twistlm.training import TwistTrainer, TwistTrainingConfig
from twistlm.twists.features import prefix_features, prefix_log_psi
from twistlm.twists.io import build_twist, load_twist

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp_hf(tiny_hf):
    """tiny_hf with its final norm's gain × 20 (logits spanning several nats: posteriors far from the prior)."""
    model = copy.deepcopy(tiny_hf.model)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    return twistlm.HFLM(model, tiny_hf.tokenizer, name="tiny-sharp")


def _problems(lm, n, seed, T=2):
    return get_task("infilling").build(lm, max_new_tokens=T, prompt="ab", ending_tokens=1, problems=n, seed=seed)


def _adapted(lm, scale=0.3):
    twist = build_twist("ratio", lm, None, r=4, seed=0, condition="observation")
    with torch.no_grad():
        for name, p in twist.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return twist


def _definition(lm, twist, target, tokens, prompt_index):
    """(N, V) log q_θ(s_<t, v | o, x) − log p0(s_<t, v | x) from whole-prefix forwards (no cache, no carried offset)."""
    read = ObservationFirst()(target)
    rows_q = [read[b] for b in prompt_index.tolist()]
    rows_p = [target.prompt_ids[b] for b in prompt_index.tolist()]

    def logp(rows):
        from twistlm.twists.features import hf_prefix_hidden

        inner = twist.peft.get_base_model()
        ext = torch.cat([tokens, torch.zeros(len(rows), 1, dtype=torch.long)], dim=1)
        hidden = hf_prefix_hidden(inner.base_model, rows, ext, twist.eos_token_id, "cpu")
        return torch.log_softmax(twist.output_head(hidden).float(), dim=-1)

    with torch.no_grad():
        lq = logp(rows_q)
        with twist.peft.disable_adapter():
            lp = logp(rows_p)
    t = tokens.shape[1]
    taken = (lq[:, :t] - lp[:, :t]).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(dim=1) if t else 0.0
    return (lq[:, t] - lp[:, t]) + (taken.unsqueeze(1) if t else 0.0)


def test_observation_reading_ratio_twist_is_its_definition_and_normalised_against_p0(tiny_hf):
    """Inside twisted SMC (with resampling), each step's values are log q_θ(· | o, x) − log p0(· | x) of the whole
    prefix, with q_θ reading "Ending: o" before x and p0 the target's own prompt; logsumexp_v(log p0 + ℓ_t) = ℓ_t−1
    (normalised, so the twisted proposal is q_θ(· | o, x)); an out-of-sequence rebuild agrees."""
    target = _problems(tiny_hf, 3, seed=5, T=3)
    twist = _adapted(tiny_hf)
    calls = []
    run_smc(target, 5, proposal="twisted", twist=Recording(twist, calls), ess_threshold=1.0, seed=2)
    assert twist.num_rebuilds == 1
    for _, tokens, prompt_index, values, hidden in calls:
        torch.testing.assert_close(values, _definition(tiny_hf, twist, target, tokens, prompt_index), atol=1e-4,
                                   rtol=1e-4)
        with torch.inference_mode():
            logp0 = torch.log_softmax(tiny_hf.model.lm_head(hidden), dim=-1)
        if tokens.shape[1] == 0:
            offset = torch.zeros(len(values))
        else:  # ℓ_t−1(s_<t): the previous step's definition at the token taken
            before = _definition(tiny_hf, twist, target, tokens[:, :-1], prompt_index)
            offset = before.gather(1, tokens[:, -1:]).squeeze(1)
        torch.testing.assert_close(torch.logsumexp(logp0 + values, dim=-1), offset, atol=1e-4, rtol=1e-4)
    # Out of sequence: a fresh start recomputes the carried offset from the prefix (p0 over x, q_θ over o + x).
    _, tokens, prompt_index, values, hidden = calls[-1]
    twist.start(target, 5)
    ctx = twistlm.TwistContext(hidden, tokens, tokens.shape[1] + 1, 3, prompt_index)
    with torch.inference_mode():
        again = twist.log_psi(ctx)
    torch.testing.assert_close(again, values, atol=1e-4, rtol=1e-4)
    assert twist.num_rebuilds == 2


def test_twisted_smc_with_the_conditioned_twist_weights_are_exact(tiny_hf):
    """Each particle's final log weight is log φ_o(s) − log ψ_T(s) = log p0(s | x) φ_o(s) − log q_θ(s | o, x):
    the twist is read against p0 of the target's prompt, not of what q_θ reads."""
    target = _problems(tiny_hf, 2, seed=3, T=2)
    twist = _adapted(tiny_hf)
    results = run_smc(target, 6, proposal="twisted", twist=twist, ess_threshold=0.0, seed=4)
    for b, r in enumerate(results):
        assert not r.resampled_at
        seqs = [list(s) for s in r.token_ids]
        feats = prefix_features(tiny_hf, target.prompt_ids, seqs, prompt_index=[b] * len(seqs), max_new_tokens=2)
        twist.bind_target(target)
        with torch.no_grad():
            lpsi = prefix_log_psi(twist, feats).gather(-1, feats.tokens.unsqueeze(-1)).squeeze(-1)
        last = lpsi[torch.arange(len(seqs)), feats.lengths - 1].double()
        log_phi = target.log_phi(seqs, [b] * len(seqs)).double()
        finite = torch.isfinite(log_phi)
        torch.testing.assert_close(r.log_weights[finite], (log_phi - last)[finite], atol=1e-4, rtol=1e-4)


def test_observed_positives_are_each_prompts_exact_sample(tiny_hf):
    target = _problems(tiny_hf, 3, seed=1)
    source = get_positive_source("observed", target)
    sub = target.select([2, 0])
    drawn = source.draw(PositiveRequest(sub, None, 3, torch.Generator().manual_seed(0)))
    exact = target.extras[EXACT_SAMPLE_KEY]
    assert drawn.sequences == [exact[2]] * 3 + [exact[0]] * 3
    torch.testing.assert_close(drawn.log_phi, sub.log_phi(drawn.sequences, [0] * 3 + [1] * 3).double().view(2, 3))
    assert torch.isfinite(drawn.log_phi).all() and float(drawn.log_weight.abs().max()) == 0.0
    with pytest.raises(ConfigError, match="exact sample"):
        get_positive_source("observed", Target(tiny_hf, prompt="ab", max_new_tokens=2))


def test_ctl_on_bdmc_pairs_learns_the_posterior_of_unseen_endings(sharp_hf, tmp_path):
    """Maximum likelihood of q_θ(s | o, x) on joint p0 draws (observed positives, 32 problems per update, no
    negatives): the enumerated KL(σ_o‖q) averaged over problems drawn with another seed falls below p0's — the best
    a twist that does not read o can do, since amortized over o ~ p0 the best q(s | x) is p0 itself. (On this random
    model, reading o costs at first: start 0.94 nats against p0's 0.85; 256 problems instead of 8,192 memorise.)"""
    train = _problems(sharp_hf, 8192, seed=1)
    held = _problems(sharp_hf, 6, seed=99)
    twist = build_twist("ratio", sharp_hf, train, r=16, seed=0, condition="observation")
    base = build_twist("ratio", sharp_hf, train, r=4, seed=0)  # q = p0: KL(σ_o‖p0)

    def mean_kl(tw):
        return sum(exact_kl(held, tw, prompt=b) for b in range(held.num_prompts)) / held.num_prompts

    before, prior = mean_kl(twist), mean_kl(base)
    cfg = TwistTrainingConfig(output_dir=str(tmp_path / "inf"), loss="ctl", positives="observed", num_positives=1,
                              prompts_per_step=32, learning_rate=0.003, max_steps=300, weight_decay=0.0, seed=0,
                              eval_particles=2, logging_steps=10**6, save_steps=0, plot=False)
    trainer = TwistTrainer(twist, train, cfg)
    trainer._negatives = lambda: pytest.fail("negatives drawn for a normalised twist")
    trainer.train()
    after = mean_kl(twist)
    print("mean KL(σ_o‖q): p0", prior, "start", before, "→", after)
    assert after < 0.9 * min(prior, before)
    loaded = load_twist(tmp_path / "inf", sharp_hf)
    assert loaded.condition == "observation"
    assert abs(mean_kl(loaded) - after) < 1e-4


def test_a_twist_reading_the_observation_needs_the_target(tiny_hf):
    twist = build_twist("ratio", tiny_hf, None, r=4, seed=0, condition="observation")
    with pytest.raises(ConfigError, match="start it with the target"):
        twist.start([[1, 2, 3]])
    with pytest.raises(ConfigError, match="observation"):
        twist.start(Target(tiny_hf, prompt="ab", max_new_tokens=2))
    with pytest.raises(ConfigError, match="unknown policy condition"):
        build_twist("ratio", tiny_hf, None, r=4, condition="label")


def test_the_infilling_recipe_and_dataset_mode_over_built_problems(tiny_hf):
    recipe = twist_recipe("ctl", None, "infilling")
    assert recipe.twist_kind == "ratio" and recipe.twist_options["condition"] == "observation"
    assert recipe.config["positives"] == "observed" and recipe.task_options["problems"] > 1
    assert twist_recipe("ctl", "ratio", "infilling") is recipe
    assert twist_recipe("ctl", "embedding", "infilling") is twist_recipe("ctl", "embedding")
    assert twist_recipe("ctl", None, "sentiment") is twist_recipe("ctl")
    task = get_task("infilling")
    target, note = prompt_batches.training_target(task, tiny_hf, 2, {"problems": 4, "prompt": "ab",
                                                                      "ending_tokens": 1}, 2)
    assert target.num_prompts == 4 and "4 prompts, 2 per update" in note
    with pytest.raises(ConfigError, match="built one prompt"):
        prompt_batches.training_target(task, tiny_hf, 2, {"prompt": "ab", "ending_tokens": 1}, 2)
    with pytest.raises(ConfigError, match="problems= is for mode=bdmc"):
        task.build(tiny_hf, data="x.csv", problems=3)


@pytest.mark.usefixtures("toy_task")
def test_train_twist_cli_refuses_observed_positives_without_exact_samples(tmp_path, capsys):
    argv = ["train-twist", "--task", "toy-letter", "--model", "toy", "--twist-kind", "tabular", "--positives",
            "observed", "--steps", "1", "--out", str(tmp_path / "o")]
    assert run_app(argv) == 2
    err = capsys.readouterr().err
    assert "exact sample" in err and "Traceback" not in err
