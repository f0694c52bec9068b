"""Off-policy twist training on a cached p0 corpus (twistlm.corpus, twistlm.corpus_training), on the toy LM.

Exactness: trained on a corpus of p0 samples, CTL (positives ∝ φ from the corpus), SIXO and FUDGE each reach the
enumerated optimum (KL(σ‖q) small) — the same standard as the on-policy trainer's tests. Mechanics: the corpus
records the sampler's own features, a killed corpus build resumes to the same corpus, a killed-and-resumed training
run equals an uninterrupted one, and misuse is refused with one line.
"""

from __future__ import annotations

import pytest
import torch
from test_training import SoftLetter, exact_kl

import twistlm
from twistlm import Target
from twistlm.corpus import CHUNK_NAME, build_corpus, load_corpus
from twistlm.corpus_training import CorpusTwistTrainer, make_twist_trainer
from twistlm.errors import ConfigError
from twistlm.training import TwistTrainer, TwistTrainingConfig
from twistlm.twists.features import prefix_features
from twistlm.twists.io import read_weights
from twistlm.twists.tabular import TabularTwist

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return twistlm.ToyLM(vocab_size=5, seed=1)


@pytest.fixture(scope="module")
def target(lm):
    return Target(lm, prompts=["a", "b"], potential=SoftLetter(), max_new_tokens=3, extras={"label": [0, 1]})


def _config(out, loss="ctl", steps=300, **kw):
    base = dict(output_dir=str(out), loss=loss, learning_rate=0.1, max_steps=steps, num_particles=64,
                num_positives=64, corpus_size=4096, logging_steps=10**6, save_steps=0, seed=3, plot=False,
                lr_scheduler_type="linear")
    return TwistTrainingConfig(**{**base, **kw})


def test_corpus_records_the_samplers_features(lm, target, tmp_path):
    """hidden[n, t−1] is h_t(s^n_<t), as an independent forward pass computes it; φ is the target's."""
    corpus = build_corpus(target, tmp_path / "c", 40, seed=1, chunk_particles=16)
    assert corpus.num_rows == 2 * 48  # whole chunks: ⌈40 / 16⌉ = 3 per prompt
    seqs = [corpus.tokens[n, : corpus.lengths[n]].tolist() for n in range(corpus.num_rows)]
    feats = prefix_features(lm, target.prompt_ids, seqs, prompt_index=corpus.prompt_index, max_new_tokens=3)
    mask = feats.mask.unsqueeze(-1)
    assert torch.allclose(corpus.hidden * mask, feats.hidden.float() * mask, atol=1e-5)
    phi = target.log_phi(seqs, corpus.prompt_index.tolist())
    assert torch.allclose(corpus.log_phi, torch.as_tensor(phi, dtype=torch.float64))


def test_killed_corpus_build_resumes_to_the_same_corpus(target, tmp_path):
    whole = build_corpus(target, tmp_path / "whole", 48, seed=2, chunk_particles=16)
    part = tmp_path / "part"
    build_corpus(target, part, 48, seed=2, chunk_particles=16)
    (part / CHUNK_NAME.format(2)).unlink()  # as if killed before the last chunk
    (part / CHUNK_NAME.format(1)).write_bytes(b"half a file")  # and one chunk damaged
    resumed = build_corpus(target, part, 48, seed=2, chunk_particles=16)
    for name in ("tokens", "lengths", "prompt_index", "log_phi", "hidden"):
        assert torch.equal(getattr(whole, name), getattr(resumed, name)), name
    grown = build_corpus(target, part, 64, seed=2, chunk_particles=16)  # a larger corpus extends the smaller one
    assert grown.num_rows == 2 * 64 and torch.equal(grown.tokens[: 2 * 48], whole.tokens)


def test_corpus_drawn_in_shards_equals_one_process_corpus(target, tmp_path):
    """Shards (i, n) draw chunks c ≡ i mod n; until the last shard is done there is no corpus, then it is the one a
    single process draws."""
    whole = build_corpus(target, tmp_path / "whole", 64, seed=2, chunk_particles=16)
    shared = tmp_path / "shared"
    assert build_corpus(target, shared, 64, seed=2, chunk_particles=16, shard=(1, 3)) is None
    assert sorted(p.name for p in shared.glob("chunk-*")) == [CHUNK_NAME.format(1)]
    assert build_corpus(target, shared, 64, seed=2, chunk_particles=16, shard=(2, 3)) is None
    sharded = build_corpus(target, shared, 64, seed=2, chunk_particles=16, shard=(0, 3))
    for name in ("tokens", "lengths", "prompt_index", "log_phi", "hidden"):
        assert torch.equal(getattr(whole, name), getattr(sharded, name)), name
    with pytest.raises(ConfigError, match="shard"):
        build_corpus(target, shared, 64, seed=2, chunk_particles=16, shard=(3, 3))


def test_corpus_of_another_target_or_seed_is_refused(lm, target, tmp_path):
    build_corpus(target, tmp_path / "c", 16, seed=0, chunk_particles=16)
    other = Target(lm, prompts=["a", "b"], potential=SoftLetter(), max_new_tokens=2, extras={"label": [0, 1]})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        build_corpus(other, tmp_path / "c", 16, seed=0, chunk_particles=16)
    with pytest.raises(ConfigError, match="seed"):
        build_corpus(target, tmp_path / "c", 16, seed=1, chunk_particles=16)
    with pytest.raises(ConfigError, match="not a corpus folder"):
        load_corpus(tmp_path)


@pytest.mark.parametrize("loss", ["ctl", "sixo", "fudge"])
def test_corpus_training_reaches_the_optimal_twist(loss, lm, tmp_path):
    """Each off-policy loss, fed only from a cached corpus of 4,096 p0 samples, drives KL(σ‖q) of the twist-induced
    proposal from ≈ 0.4 to < 0.05 (the tabular twist can represent ψ* exactly)."""
    target = Target(lm, prompt="a", potential=SoftLetter(), max_new_tokens=3)
    output = "sigmoid" if loss == "fudge" else "log"
    twist = TabularTwist.for_target(target, output=output)
    before = exact_kl(target, twist)
    trainer = CorpusTwistTrainer(twist, target, _config(tmp_path / loss, loss=loss, corpus_dir=str(tmp_path / "c")))
    trainer.train()
    after = exact_kl(target, twist)
    print(loss, "KL(σ‖q)", before, "→", after)
    assert before > 0.2 and after < 0.05


def test_killed_and_resumed_corpus_training_equals_uninterrupted(target, tmp_path):
    """Stop after checkpoint 20 of 40, resume with a fresh trainer object (as after a kill): the same twist."""

    class StopAt20:
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 20

    def run(out, resume=False, callbacks=()):
        twist = TabularTwist.for_target(target, per_prompt=True, init_scale=0.5, seed=1)
        cfg = _config(out, steps=40, save_steps=20, resume=resume, corpus_dir=str(tmp_path / "c"))
        CorpusTwistTrainer(twist, target, cfg, callbacks=callbacks).train()
        return twist

    whole = run(tmp_path / "whole")
    run(tmp_path / "split", callbacks=[StopAt20()])
    resumed = run(tmp_path / "split", resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert read_weights(tmp_path / "split").keys() == read_weights(tmp_path / "whole").keys()


def test_corpus_trainer_refusals_and_factory(target, tmp_path):
    twist = TabularTwist.for_target(target, per_prompt=True)
    with pytest.raises(ConfigError, match="rl loss cannot train on a cached corpus"):
        CorpusTwistTrainer(twist, target, _config(tmp_path / "rl", loss="rl"))
    with pytest.raises(ConfigError, match="corpus_size must be ≥ 0"):
        _config(tmp_path, corpus_size=-1)
    assert isinstance(make_twist_trainer(twist, target, _config(tmp_path / "a")), CorpusTwistTrainer)
    plain = make_twist_trainer(twist, target, _config(tmp_path / "b", corpus_size=0, positives="exact"))
    assert type(plain) is TwistTrainer


@pytest.mark.parametrize("kind", ["linear", "mlp", "embedding", "conditional"])
def test_gathered_head_values_equal_the_full_vocabulary_head(kind, lm, tmp_path):
    """log ψ at the stored tokens (what corpus training evaluates) = the full (N, T, V) head gathered at them."""
    from twistlm.twists.features import log_psi_at_tokens, prefix_log_psi
    from twistlm.twists.io import build_twist

    target = Target(lm, prompts=["a", "b"], potential=SoftLetter(), max_new_tokens=3, extras={"label": [0, 1]})
    options = {"init_scale": 0.3}
    if kind == "embedding":
        options["rank"] = 2
    twist = build_twist(kind, lm, target, **options)
    corpus = build_corpus(target, tmp_path / "c", 8, chunk_particles=8)
    seqs = [corpus.tokens[n, : corpus.lengths[n]].tolist() for n in range(corpus.num_rows)]
    feats = prefix_features(lm, target.prompt_ids, seqs, prompt_index=corpus.prompt_index, max_new_tokens=3)
    full = prefix_log_psi(twist, feats).gather(-1, feats.tokens.unsqueeze(-1)).squeeze(-1)
    at = log_psi_at_tokens(twist, feats.hidden, feats.tokens, feats.prompt_index, feats.lengths)
    assert torch.allclose(full.double(), at.double(), atol=1e-5)


def test_low_rank_embedding_twist_reloads_identically(lm, tmp_path):
    from twistlm.twists.embedding import EmbeddingTwist
    from twistlm.twists.io import load_twist

    twist = EmbeddingTwist.for_lm(lm, width=8, rank=2, init_scale=0.5, seed=3)
    twist.save_pretrained(tmp_path)
    again = load_twist(tmp_path, lm)
    assert again.rank == 2 and torch.equal(again.out.embeddings, twist.out.embeddings)
    with pytest.raises(ConfigError, match="rank must be ≥ 1"):
        EmbeddingTwist.for_lm(lm, rank=0)


def test_recipe_fills_what_the_user_left_out():
    from twistlm.recipes import twist_recipe

    ctl = twist_recipe("ctl")
    assert ctl.settings({})["corpus_tokens"] > 0
    mine = ctl.settings({"learning_rate": 0.5, "max_steps": None})
    assert mine["learning_rate"] == 0.5 and mine["max_steps"] == ctl.config["max_steps"]
    on_policy = ctl.settings({"positives": "buffer"})  # on-policy: none of the corpus recipe applies
    assert "corpus_tokens" not in on_policy and "weight_decay" not in on_policy
    with pytest.raises(ConfigError, match="no training recipe"):
        twist_recipe("kl")
    # Per kind: CTL's default is the ratio twist; the heads keep rounds 3–5's recipe (options for the embedding head
    # only), and a kind without a recipe of its own gets the loss's default training settings.
    assert ctl.twist_kind == "ratio" and twist_recipe("ctl", None) is ctl
    embedding = twist_recipe("ctl", "embedding")
    assert embedding.twist_kind == "embedding" and embedding.config["max_steps"] == 1000
    assert embedding.config["weight_decay"] == 1.0 and twist_recipe("ctl", "mlp").config == embedding.config
    assert not twist_recipe("ctl", "mlp").twist_options and twist_recipe("ctl", "my-kind") is ctl
    sixo = twist_recipe("sixo")
    assert sixo.twist_kind == "ratio" and sixo.config["num_particles"] == 32
    assert twist_recipe("sixo", "embedding").config["max_steps"] == 1000
