"""Classification by verbalized labels (twistlm.classify) and ``twistlm classify``.

Exactness: p_θ(l | c) equals the brute-force product of next-token probabilities, normalised over labels, on the toy
LM and a tiny HF model (both scoring paths), with rationales appended to the context. LoRA SFT drives a tiny HF model
from chance to every training example right; few-shot writes every demonstration once, in a seeded order; the
accuracy interval is the Wilson interval; the command's bad input exits 2 with one line before any model loads.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_training import CharTokenizer

import twistlm
from twistlm.classify import Labelled, SFTSettings, accuracy, context_ids, fit, label_log_probs
from twistlm.cli.app import USAGE_ERROR, run_app
from twistlm.errors import ConfigError
from twistlm.solve import wilson_interval

pytestmark = pytest.mark.usefixtures("one_thread")


class Letters:
    """A two-label format over plain letters (the toy LM's and CharTokenizer's alphabet)."""

    label_names = ("no", "yes")

    def prompt(self, text: str) -> str:
        return text + "c"

    def verbalizer(self, label: int) -> str:
        return ("ab", "ba")[label]

    def demo(self, text: str, label: int) -> str:
        return self.prompt(text) + self.verbalizer(label) + "d"


def _brute(lm, context, verbalizer) -> float:
    state = lm.prefill([list(context)], 1)
    total = 0.0
    for j, tok in enumerate(verbalizer):
        total += float(state.logprobs[0, tok])
        if j + 1 < len(verbalizer):
            state = lm.step(state, torch.tensor([tok]))
    return total


@pytest.mark.parametrize("which", ["toy", "hf"])
def test_label_probabilities_are_the_normalised_verbalizer_likelihoods(which, tiny_hf):
    lm = twistlm.ToyLM(vocab_size=5, seed=1) if which == "toy" else tiny_hf
    fmt = Letters()
    texts, rationales = ["ab", "ba", "bbb"], ["", "a", "ab"]
    contexts = [context_ids(lm, fmt, t, z) for t, z in zip(texts, rationales)]
    verbs = [list(lm.encode(v)) if which == "toy" else lm.tokenizer(v, add_special_tokens=False)["input_ids"]
             for v in ("ab", "ba")]
    got = label_log_probs(lm, contexts, verbs, batch_size=2)
    for i, c in enumerate(contexts):
        raw = torch.tensor([_brute(lm, c, v) for v in verbs], dtype=torch.float64)
        assert torch.allclose(got[i], torch.log_softmax(raw, 0), atol=1e-5)
    assert contexts[2][-2:] == (lm.encode("ab") if which == "toy" else [2, 3])  # the rationale follows the prompt


def test_lora_sft_fits_the_labelled_examples(tiny_hf):
    """Labels that depend only on the first letter: chance before, every example right after SFT."""
    import copy

    lm = twistlm.HFLM(copy.deepcopy(tiny_hf.model), CharTokenizer(), name="tiny-copy")
    fmt = Letters()
    data = [Labelled(t, int(t[0] == "b")) for t in ("aab", "abb", "aba", "bab", "bba", "baa", "aaa", "bbb")]
    texts, gold = [d.text for d in data], [d.label for d in data]
    before = fit("zero-shot", lm, fmt, data).predict(texts)
    assert accuracy(before, gold).value <= 0.75
    losses = []
    clf = twistlm.classify.fit_lora_classifier(lm, fmt, data, torch.Generator().manual_seed(0),
                                                SFTSettings(r=4, learning_rate=3e-3, epochs=80, batch_size=4),
                                                on_epoch=lambda e, loss: losses.append(loss))
    assert clf.predict(texts) == gold
    assert losses[-1] < 0.5 * losses[0]


def test_the_adapter_initialisation_follows_the_seed_not_the_global_rng(tiny_hf):
    """peft draws LoRA's A from the global torch RNG: the classifier's adapter must come from the run's generator
    (same seed, whatever was drawn before, gives the same adapter; another seed another), and leave the global RNG as
    it was."""
    import copy

    def adapter(seed: int, global_seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(global_seed)
        lm = twistlm.HFLM(copy.deepcopy(tiny_hf.model), CharTokenizer(), name="tiny-copy")
        lm = SFTSettings(r=4).attach(lm, torch.Generator().manual_seed(seed))
        weights = [p.detach().clone() for n, p in lm.peft_model.named_parameters() if "lora_A" in n]
        return weights, torch.rand(1)

    first, after_first = adapter(seed=0, global_seed=1)
    again, after_again = adapter(seed=0, global_seed=2)
    other, _ = adapter(seed=1, global_seed=1)
    assert first and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    torch.manual_seed(1)
    assert torch.equal(after_first, torch.rand(1))  # the global stream is untouched by the seeded draw
    assert not torch.equal(after_first, after_again)


def test_few_shot_writes_each_demonstration_once_in_a_seeded_order():
    lm, fmt = twistlm.ToyLM(vocab_size=5, seed=1), Letters()
    data = [Labelled(t, k % 2) for k, t in enumerate(("a", "b", "aa", "bb", "ab"))]
    a, b = fit("few-shot", lm, fmt, data, seed=3), fit("few-shot", lm, fmt, data, seed=3)
    assert a.prefix == b.prefix and sorted(a.prefix.split("d")[:-1]) == sorted(fmt.demo(d.text, d.label)[:-1]
                                                                               for d in data)
    orders = {fit("few-shot", lm, fmt, data, seed=s).prefix for s in range(6)}
    assert len(orders) > 1


def test_accuracy_interval_and_refusals():
    acc = accuracy([1, 0, 1, 1], [1, 1, 1, 1])
    assert acc.value == 0.75 and acc.interval == wilson_interval(0.75, 4)
    assert acc.to_dict()["correct"] == 3 and math.isnan(accuracy([], []).value)
    with pytest.raises(ConfigError, match="predictions"):
        accuracy([1], [1, 0])
    with pytest.raises(ConfigError, match="unknown classifier method"):
        fit("vibes", twistlm.ToyLM(vocab_size=5, seed=1), Letters(), [])
    with pytest.raises(ConfigError, match="two labels"):
        label_log_probs(twistlm.ToyLM(vocab_size=5, seed=1), [[0]], [[1]])
    with pytest.raises(ConfigError, match="Hugging Face"):
        fit("lora-sft", twistlm.ToyLM(vocab_size=5, seed=1), Letters(), [Labelled("a", 0)])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "vibes"], "unknown classifier method"),
        (["--limit", "0"], "--limit"),
        (["--index", "9000"], "exceeds"),
        (["--lr", "-1"], "--lr"),
    ],
)
def test_classify_command_refuses_bad_input_with_one_line(args, message, shared_data, capsys):
    subj = shared_data / "subj"
    code = run_app(["classify", "--labelled", str(subj / "train.10.jsonl"), "--data", str(subj / "train.jsonl"), *args])
    err = capsys.readouterr().err
    assert code == USAGE_ERROR and message in err and "Traceback" not in err


def test_classify_command_checks_the_policy_before_loading(tmp_path, shared_data, capsys):
    subj = shared_data / "subj"
    args = ["classify", "--labelled", str(subj / "train.10.jsonl"), "--data", str(subj / "train.jsonl")]
    assert run_app([*args, "--policy", str(tmp_path)]) == USAGE_ERROR
    assert "add latent-em to --methods" in capsys.readouterr().err
    assert run_app([*args, "--methods", "latent-em", "--policy", str(tmp_path / "gone")]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert "gone" in err and "Traceback" not in err


@pytest.mark.model
def test_the_subjectivity_gfn_problem_has_one_stop_and_reads_the_sentence_only(smol, shared_data):
    from twistlm.gfn.problems import SUBJECTIVITY_RECIPE, build_problem, stop_token
    from twistlm.gfn.rewards import reward_for

    problem = build_problem("subjectivity", smol, data=str(shared_data / "subj/train.10.jsonl"))
    target = problem.target
    assert target.num_prompts == 10 and problem.condition == "prompt" and problem.config == SUBJECTIVITY_RECIPE
    assert problem.space.stop_ids == (stop_token(smol),)
    other_stops = [t for t in target.stop_ids if t != stop_token(smol)]
    assert other_stops and not bool(problem.space.allowed[other_stops].any())
    assert reward_for(target, problem.space.stop_ids).prefix_defined  # SubTB can use it
    with pytest.raises(ConfigError, match="no subjectivity examples"):
        build_problem("subjectivity", smol, data=str(shared_data / "subj/train.10.jsonl"), index=10)


def test_classify_command_names_a_missing_file(tmp_path, capsys):
    code = run_app(["classify", "--labelled", str(tmp_path / "none.jsonl"), "--data", str(tmp_path / "x.jsonl")])
    assert code == USAGE_ERROR and "none.jsonl" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- latent-rationale EM


class LettersWithRationale(Letters):
    max_rationale_tokens = 2

    def rationale_stop_ids(self, lm):
        return ()


def test_e_step_resamples_rationales_by_the_label_probability():
    """Each kept rationale is one of the K drawn, chosen ∝ p_θ(y | x, z): frequencies over many picks match."""
    from twistlm.classify import Classifier
    from twistlm.latent_em import EMSettings, e_step

    lm, fmt = twistlm.ToyLM(vocab_size=5, seed=1), LettersWithRationale()
    clf = Classifier(lm, fmt)
    ex = [Labelled("ab", 1)]
    gen = torch.Generator().manual_seed(0)
    kept, _ = e_step(clf, ex, EMSettings(rationales=4, kept=4000), gen)
    drawn = sorted({k.rationale for k in kept})
    assert 1 <= len(drawn) <= 4 and all(len(z) <= 2 for z in drawn)
    # the same draws again (same seed): the pick frequencies follow the weights
    gen = torch.Generator().manual_seed(0)
    from twistlm.latent_em import sample_rationales

    zs = sample_rationales(lm, fmt, ["ab"], 4, gen)[0]
    w = torch.softmax(clf.log_probs(["ab"] * 4, zs)[:, 1], 0)
    for z in drawn:
        expected = float(sum(w[j] for j in range(4) if zs[j] == z))
        observed = sum(k.rationale == z for k in kept) / len(kept)
        assert abs(observed - expected) < 0.04


def test_e_step_with_a_policy_proposal_picks_from_the_exact_posterior():
    """SIR from another LM q (the policy's role) with weights p0(z | x) p_θ(y | x, z) / q(z | x, y): the kept
    rationales follow σ(z | x, y) ∝ p0(z | x) p_θ(y | x, z), enumerated; q = p0 gives log ratios of exactly 0."""
    from collections import Counter

    from twistlm.classify import Classifier
    from twistlm.exact import enumerate_target
    from twistlm.latent_em import EMSettings, PolicyRationales, e_step

    lm, fmt = twistlm.ToyLM(vocab_size=5, seed=1), LettersWithRationale()
    clf, ex = Classifier(lm, fmt), [Labelled("ab", 1)]
    exact = enumerate_target(twistlm.Target(lm, prompts=[fmt.prompt("ab")], max_new_tokens=2, stop_token_ids=()))
    texts = [lm.decode(list(z)) for z in exact.sequences]
    log_post = exact.log_p0 + clf.log_probs(["ab"] * len(texts), texts)[:, 1]
    post = Counter()
    for z, p in zip(texts, torch.softmax(log_post, 0).tolist()):
        post[z] += p
    policy = PolicyRationales(twistlm.ToyLM(vocab_size=5, seed=7))
    kept, ess = e_step(clf, ex, EMSettings(rationales=20000, kept=8000), torch.Generator().manual_seed(0), policy)
    got = Counter(k.rationale for k in kept)
    assert 0.01 < ess < 0.5  # q is far from the posterior (the weights do the work)
    for z in set(post) | set(got):
        assert abs(got[z] / len(kept) - post[z]) < 0.04, z  # ESS ≈ 2,700 of 20,000: sd ≈ 0.011
    _, ratio = PolicyRationales(twistlm.ToyLM(vocab_size=5, seed=1)).draw(lm, fmt, ["ab"], 50, torch.Generator())
    assert ratio.shape == (1, 50) and float(ratio.abs().max()) < 1e-9


def test_rationale_classifier_marginalises_its_rationales():
    from twistlm.latent_em import RationaleClassifier

    lm, fmt = twistlm.ToyLM(vocab_size=5, seed=1), LettersWithRationale()
    clf = RationaleClassifier(lm, fmt, rationales=3, generator=torch.Generator().manual_seed(2))
    got = clf.log_probs(["ab", "b"])
    for i, (x, zs) in enumerate(zip(["ab", "b"], clf.last_rationales)):
        per = clf.log_probs([x] * 3, zs)
        assert torch.allclose(got[i], torch.logsumexp(per, 0) - math.log(3))
        assert torch.allclose(got[i].exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_rationale_classifier_predicts_from_the_policys_rationales():
    """With a sampler, prediction averages p_θ(y | x, z) over the policy's rationales (seeded: the same draws)."""
    from twistlm.latent_em import PolicyRationales, RationaleClassifier

    lm, fmt = twistlm.ToyLM(vocab_size=5, seed=1), LettersWithRationale()
    sampler = PolicyRationales(twistlm.ToyLM(vocab_size=5, seed=7))
    clf = RationaleClassifier(lm, fmt, 3, torch.Generator().manual_seed(2), sampler)
    got = clf.log_probs(["ab"])
    zs, _ = sampler.draw(lm, fmt, ["ab"], 3, torch.Generator().manual_seed(2))
    assert clf.last_rationales == zs
    assert torch.allclose(got[0], torch.logsumexp(clf.log_probs(["ab"] * 3, zs[0]), 0) - math.log(3))
    # a policy trained with at most one action before its stop draws rationales of one token (horizon max_len + 1)
    from twistlm.gfn.sampling import ActionSpace

    short = PolicyRationales(sampler.policy, ActionSpace(torch.ones(5, dtype=torch.bool), (lm.eos_token_id,), 0, 0))
    zs, _ = short.draw(lm, fmt, ["ab"], 20, torch.Generator().manual_seed(3))
    assert max(len(z) for z in zs[0]) == 1


def test_latent_em_runs_its_rounds_with_a_policy_on_its_own_model(tiny_hf):
    """Two EM rounds on a tiny HF model, rationales from a policy on a separate copy: each round records its E-step
    ESS (a fraction) and M-step loss, and prediction gives one label per input from the policy's rationales."""
    import copy

    from twistlm.latent_em import EMSettings, PolicyRationales, fit_latent_em

    lm = twistlm.HFLM(copy.deepcopy(tiny_hf.model), CharTokenizer(), name="tiny-copy")
    policy = PolicyRationales(twistlm.HFLM(copy.deepcopy(tiny_hf.model), CharTokenizer(), name="tiny-copy"))
    data = [Labelled(t, int(t[0] == "b")) for t in ("aab", "abb", "bab", "bba")]
    settings = EMSettings(rounds=2, rationales=4, kept=2, predict_rationales=2,
                          sft=SFTSettings(r=4, learning_rate=3e-3, epochs=2, batch_size=4))
    clf = fit_latent_em(lm, LettersWithRationale(), data, torch.Generator().manual_seed(0), settings, sampler=policy)
    assert [r["round"] for r in clf.rounds] == [1, 2]
    assert all(0.25 <= r["ess_fraction"] <= 1.0 and math.isfinite(r["loss"]) for r in clf.rounds)
    pred = clf.predict(["ab", "ba"])
    assert len(pred) == 2 and set(pred) <= {0, 1} and len(clf.last_rationales[0]) == 2


def test_latent_em_refuses_bad_settings():
    from twistlm.latent_em import EMSettings, fit_latent_em

    with pytest.raises(ConfigError, match="kept"):
        fit_latent_em(twistlm.ToyLM(vocab_size=5, seed=1), LettersWithRationale(), [Labelled("a", 0)],
                      torch.Generator(), EMSettings(kept=0))
