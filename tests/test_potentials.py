"""Composable potentials: combinators, classifiers on real text, TRL-style rewards, GSM8K, likelihood potentials."""

from __future__ import annotations

import math

import pytest
import torch

import twistlm
from twistlm.errors import ConfigError, ModelLoadError, PotentialError
from twistlm.exact import enumerate_target
from twistlm.potentials import (
    FunctionPotential,
    HFClassifierPotential,
    Indicator,
    InfillingPotential,
    LengthPotential,
    RewardPotential,
    Scaled,
    SentimentPotential,
    Sequences,
    Sum,
    TemperedPotential,
    Threshold,
    ToxicityPotential,
    gsm8k_potential,
    potential_from_spec,
    score_continuations,
)
from twistlm.potentials.classifiers import sentiment_class_log_probs

NEG_INF = float("-inf")


def seqs_of(texts, prompts=None, extras=None, token_ids=None) -> Sequences:
    prompts = prompts or [""] * len(texts)
    return Sequences(
        prompts=list(prompts),
        texts=list(texts),
        token_ids=token_ids if token_ids is not None else [[0] * len(t) for t in texts],
        prompt_index=list(range(len(texts))),
        extras=extras or {},
    )


def const(values, bounded=False, name="const") -> FunctionPotential:
    return FunctionPotential(lambda texts: [values[t] for t in texts], name=name, bounded=bounded)


# ----- classifiers on real text -----

OFFENSIVE = "You are a worthless piece of shit, go fuck yourself you stupid idiot"
BENIGN = "Thank you for the lovely afternoon tea, the garden looked beautiful."
NEGATIVE_REVIEW = "This is the worst product ever, total garbage"
POSITIVE_REVIEW = "Absolutely wonderful, I love it"


def test_toxicity_ranks_offensive_above_benign():
    toxic = ToxicityPotential()
    nontoxic = potential_from_spec("toxicity:nontoxic")
    assert toxic.bounded and nontoxic.bounded and toxic.name == "toxicity:toxic"
    seqs = seqs_of([OFFENSIVE, BENIGN])
    lt, ln = toxic(seqs), nontoxic(seqs)
    assert lt[0] > lt[1] and ln[0] < ln[1]
    assert math.exp(lt[0]) > 0.9 and math.exp(lt[1]) < 0.2
    assert torch.all(torch.isfinite(lt)) and torch.all(torch.isfinite(ln))  # clipped: never a hard zero
    assert torch.allclose(lt.exp() + ln.exp(), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ConfigError):
        ToxicityPotential(label="rude")


def test_toxicity_can_read_the_prompt():
    seqs = seqs_of(["and that is what I think."], prompts=[OFFENSIVE + " "])
    assert ToxicityPotential(include_prompt=True)(seqs)[0] > ToxicityPotential()(seqs)[0]


def test_sentiment_classes_on_reviews():
    seqs = seqs_of([NEGATIVE_REVIEW, POSITIVE_REVIEW, "The package arrived on Tuesday."])
    table = torch.stack([SentimentPotential(c)(seqs) for c in range(1, 6)], dim=1)  # (3, 5) log p(c | s)
    assert table.argmax(dim=1).tolist() == [0, 4, 2]  # classes 1, 5, 3
    assert torch.allclose(table.exp().sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.all(table <= 0)
    assert potential_from_spec("sentiment:5").bounded
    for bad in ("sentiment:0", "sentiment:6", "sentiment:x", "sentiment"):
        with pytest.raises(ConfigError):
            potential_from_spec(bad)


def test_sentiment_mapping_is_a_symmetric_distribution():
    lp = sentiment_class_log_probs([-1.0, -0.6249, 0.0, 0.6249, 1.0])
    assert torch.allclose(lp.exp().sum(1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(lp, lp.flip(0).flip(1))  # x ↦ −x mirrors the classes
    assert lp.argmax(1).tolist() == [0, 0, 2, 4, 4]


# ----- combinators -----

VALUES = {"a": -1.0, "b": -2.0, "c": NEG_INF}
OTHER = {"a": 0.5, "b": -0.25, "c": 0.0}


def test_sum_scaled_algebra_and_bounded_flags():
    p, q = const(VALUES, bounded=True, name="p"), const(OTHER, name="q")
    seqs = seqs_of(["a", "b", "c"])
    s = Sum(p, q)
    assert s(seqs).tolist() == [-0.5, -2.25, NEG_INF]
    assert not s.bounded and Sum(p, p).bounded
    assert (p + q).name == s.name and isinstance(p + q, Sum)
    assert len(Sum(Sum(p, q), p).parts) == 3  # flattened
    assert (p * 2.0)(seqs).tolist() == [-2.0, -4.0, NEG_INF]
    assert (3 * p)(seqs).tolist() == [-3.0, -6.0, NEG_INF]
    assert (p * 2).bounded and not (p * -1).bounded and not Scaled(q, 2).bounded
    assert Scaled(p, 0.0)(seqs).tolist() == [0.0, 0.0, NEG_INF]  # β → 0 keeps the support
    with pytest.raises(PotentialError, match="hard constraint"):
        Scaled(p, -1.0)(seqs)
    # a plain callable is a reward r(s): φ = exp(β r), any sign, unbounded
    reward = Scaled(lambda texts: [float(len(t)) for t in texts], 0.5)
    assert not reward.bounded and reward(seqs_of(["ab", "abcd"])).tolist() == [1.0, 2.0]
    with pytest.raises(ConfigError):
        Scaled(p, float("nan"))
    with pytest.raises(TypeError):
        p * "x"


def test_sum_reports_the_failing_part():
    bad = FunctionPotential(lambda texts: [float("nan")] * len(texts), name="broken")
    with pytest.raises(PotentialError, match="broken"):
        Sum(const(VALUES), bad)(seqs_of(["a"]))


def test_threshold_and_indicator():
    p = const(VALUES, bounded=True)
    seqs = seqs_of(["a", "b", "c"])
    above = Threshold(p, -1.5)
    below = Threshold(p, -1.5, above=False)
    assert above.bounded and below.bounded
    assert above(seqs).tolist() == [0.0, NEG_INF, NEG_INF]
    assert below(seqs).tolist() == [NEG_INF, 0.0, 0.0]  # the complement
    # on the probability scale: exp(-1) ≈ 0.37 > 0.3, exp(-2) ≈ 0.14 < 0.3, exp(-inf) = 0
    assert Threshold(p, 0.3, on="prob")(seqs).tolist() == [0.0, NEG_INF, NEG_INF]
    toxic = Threshold(ToxicityPotential(), 0.5, on="prob")
    assert toxic(seqs_of([OFFENSIVE, BENIGN])).tolist() == [0.0, NEG_INF]
    with pytest.raises(ConfigError):
        Threshold(p, 0.5, on="odds")
    ind = Indicator(lambda t: "a" in t, name="has-a")
    assert ind.bounded and ind(seqs_of(["cat", "dog"])).tolist() == [0.0, NEG_INF]


# ----- rewards -----


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def match_reward(prompts, completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def test_reward_potential_with_extras_weights_and_beta():
    pot = RewardPotential([length_reward, match_reward], weights=[0.5, 2.0], beta=0.1)
    assert not pot.bounded and pot.name == "reward:length_reward+match_reward"
    seqs = seqs_of(["7", "12"], extras={"answer": ["7", "13"]})
    assert torch.allclose(pot(seqs), torch.tensor([0.1 * (0.5 + 2.0), 0.1 * (1.0 + 0.0)], dtype=torch.float64))
    bounded = RewardPotential({"len": length_reward}, beta=1.0, max_reward=2.0)
    assert bounded.bounded and bounded(seqs).tolist() == [-1.0, 0.0]
    with pytest.raises(PotentialError, match="declares 0"):
        bounded(seqs_of(["abc"]))  # total 3 > max_reward 2
    with pytest.raises(ConfigError):
        RewardPotential([length_reward], weights=[1.0, 2.0])


def test_reward_nan_or_none_names_the_function():
    def flaky_reward(prompts, completions, **kwargs):
        return [1.0, float("nan")]

    def lazy_reward(prompts, completions, **kwargs):
        return [None, 1.0]

    def short_reward(prompts, completions, **kwargs):
        return [1.0]

    seqs = seqs_of(["x", "y"])
    for fn in (flaky_reward, lazy_reward, short_reward):
        with pytest.raises(PotentialError, match=fn.__name__):
            RewardPotential([length_reward, fn])(seqs)
    with pytest.raises(PotentialError, match="match_reward"):  # missing column: the function's own error, named
        RewardPotential(match_reward)(seqs)


PERFECT = "<reasoning>\nIt is 3 + 4 = 7.\n</reasoning>\n<answer>\n7\n</answer>\n"
MULTI_LINE = "<reasoning>\nFirst, 3 + 4 = 7.\nSo the answer is 7.\n</reasoning>\n<answer>\n7\n</answer>\n"


def test_gsm8k_potential_on_hand_checked_completions():
    # PERFECT: correctness 2 + int 0.5 + strict 0.5 + soft 0.5 + xmlcount 4 × 0.125 = 4.0 (both variants except soft
    # in the recipe: its soft regex cannot cross the newline after <reasoning>, so 3.5).
    # MULTI_LINE, recipe: strict also fails (no DOTALL) → 3.0; corrected → 4.0. Wrong answer: −2.0.
    seqs = seqs_of([PERFECT, MULTI_LINE, PERFECT], extras={"answer": ["7", "7", "#### 8"]})
    beta = 0.5
    corrected = gsm8k_potential("corrected", beta=beta)
    assert corrected.name == "gsm8k:corrected" and not corrected.bounded
    assert torch.allclose(corrected(seqs), beta * torch.tensor([4.0, 4.0, 2.0], dtype=torch.float64))
    recipe = potential_from_spec("gsm8k:recipe")
    assert torch.allclose(recipe(seqs), torch.tensor([3.5, 3.0, 1.5], dtype=torch.float64))
    bounded = gsm8k_potential(beta=2.0, bounded=True)
    assert bounded.bounded and torch.allclose(bounded(seqs), 2.0 * torch.tensor([0.0, 0.0, -2.0], dtype=torch.float64))
    with pytest.raises(ConfigError):
        gsm8k_potential("nonsense")


# ----- SMC stays unbiased with composed potentials (toy LM, exact Z by enumeration) -----


def test_smc_with_sum_and_threshold_potential_is_unbiased(toy):
    T, K, B = 3, 4, 2000
    # φ = 1[at least one "a"] · exp(−0.4 · |s|)
    count_a = FunctionPotential(lambda texts: [float(t.count("a")) for t in texts], name="count_a")
    potential = Sum(Threshold(count_a, 0.5), LengthPotential(0.4))
    assert potential.bounded
    target = twistlm.Target(lm=toy, prompts=["b"] * B, potential=potential, max_new_tokens=T)
    log_z = enumerate_target(target).log_z
    results = twistlm.run_smc(target, K, seed=3)
    z_hat = torch.tensor([r.log_z for r in results], dtype=torch.float64).exp()
    z = math.exp(log_z)
    assert 0.05 < z < 0.9  # a non-trivial target
    se = float(z_hat.std()) / math.sqrt(B)
    assert abs(float(z_hat.mean()) - z) < 4 * se, (float(z_hat.mean()), z, se)


# ----- likelihood potentials: exactness on the toy LM -----


def toy_logprob(lm, prompt_ids, tokens, score_from):
    """Σ_{j ≥ score_from} log p0(tokens_j | prompt, tokens_<j), by hand through prefill/step on one row."""
    state = lm.prefill([prompt_ids], 1)
    total = 0.0
    for j, tok in enumerate(tokens):
        if j >= score_from:
            total += float(state.logprobs[0, tok])
        state = lm.step(state, torch.tensor([tok]))
    return total


def test_infilling_matches_hand_computed_toy_logprobs(toy):
    pot = InfillingPotential(toy, observation="ab")
    assert pot.bounded and pot.observation == (0, 1)
    s = [[2, 0, 3], [1], []]
    seqs = Sequences(prompts=["ca"] * 3, texts=[toy.decode(x) for x in s], token_ids=s, prompt_index=[0, 0, 0])
    got = pot(seqs)
    want = [toy_logprob(toy, [2, 0], x + [0, 1], len(x)) for x in s]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    # per-prompt observations (text or ids) via extras, two prompts in one batch
    per_prompt = InfillingPotential(toy)
    seqs2 = Sequences(
        prompts=["ca", "d"],
        texts=["ab", "c"],
        token_ids=[[0, 1], [2]],
        prompt_index=[0, 1],
        extras={"observation": ["dd", [1, 2, 0]]},
    )
    want2 = [toy_logprob(toy, [2, 0], [0, 1, 3, 3], 2), toy_logprob(toy, [3], [2, 1, 2, 0], 1)]
    assert torch.allclose(per_prompt(seqs2), torch.tensor(want2, dtype=torch.float64), atol=1e-12)
    with pytest.raises(PotentialError, match="observation"):
        InfillingPotential(toy)(seqs)


def test_tempered_potential_on_the_toy(toy):
    seqs = Sequences(prompts=["a"], texts=["bc"], token_ids=[[1, 2]], prompt_index=[0])
    one = TemperedPotential(toy, 1.0)
    assert one(seqs).tolist() == [0.0] and one.bounded
    assert TemperedPotential(toy, 0.5).bounded and not TemperedPotential(toy, 2.0).bounded
    with pytest.raises(ConfigError):
        TemperedPotential(toy, 0.0)
    # σ ∝ p0^(1/τ) exactly: with T given, the EOS that finished s is scored too
    tau, T = 0.5, 3
    target = twistlm.Target(lm=toy, prompt="a", max_new_tokens=T, potential=TemperedPotential(toy, tau, T))
    exact = enumerate_target(target)
    assert torch.allclose(exact.log_p0 + exact.log_phi, exact.log_p0 / tau, atol=1e-10)
    assert torch.allclose(
        score_continuations(toy, [0], [[1, 2], [3]]),
        torch.tensor([toy_logprob(toy, [0], [1, 2], 0), toy_logprob(toy, [0], [3], 0)], dtype=torch.float64),
    )


# ----- likelihood potentials on the embedded model -----


@pytest.mark.model
def test_infilling_matches_full_forward_on_smol(smol):
    tok = smol.tokenizer
    prompts = ["The cat sat on the", "Once upon a time, in a small village,"]
    spans = [" mat and", " warm windowsill while the rain", ""]
    observation = " fell asleep."
    obs_ids = tok(observation, add_special_tokens=False)["input_ids"]
    span_ids = [tok(s, add_special_tokens=False)["input_ids"] for s in spans]
    pairs = [(p, s) for p in range(2) for s in range(3)]  # 2 prompts × 3 spans of different lengths
    seqs = Sequences(
        prompts=[prompts[p] for p, _ in pairs],
        texts=[spans[s] for _, s in pairs],
        token_ids=[span_ids[s] for _, s in pairs],
        prompt_index=[p for p, _ in pairs],
    )
    pot = InfillingPotential(smol, observation=observation)
    got = pot(seqs)
    # reference: one plain forward over x + s + o (no cache, default positions), right-padded rows
    rows = [smol.encode(prompts[p]) + span_ids[s] + obs_ids for p, s in pairs]
    width = max(len(r) for r in rows)
    with torch.inference_mode():
        batch = torch.tensor([r + [smol.eos_token_id] * (width - len(r)) for r in rows])
        logp = torch.log_softmax(smol.model(input_ids=batch).logits.double(), dim=-1)
    want, want_s = [], []
    for i, (p, s) in enumerate(pairs):
        start = len(smol.encode(prompts[p]))
        tokens = span_ids[s] + obs_ids
        lp = [float(logp[i, start + j - 1, t]) for j, t in enumerate(tokens)]
        want.append(sum(lp[len(span_ids[s]) :]))
        want_s.append(sum(lp[: len(span_ids[s])]))
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-4), (got, want)
    assert pot.scorer.prefills == 2  # one KV cache per distinct prompt ...
    assert torch.allclose(pot(seqs), got, atol=1e-6)
    assert pot.scorer.prefills == 2  # ... reused on the next call
    # the tempered potential uses the same scorer: τ = 0.5 gives log φ = log p0(s | x) (EOS not scored)
    lp_s = TemperedPotential(smol, 0.5)(Sequences(seqs.prompts[3:], seqs.texts[3:], seqs.token_ids[3:], [1] * 3))
    assert torch.allclose(lp_s, torch.tensor(want_s[3:], dtype=torch.float64), atol=1e-4)
    assert lp_s[2] == 0.0  # empty span


# ----- Hugging Face classifiers from a local directory (no hub) -----


def _tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "[PAD]",
        "[UNK]",
        "the",
        "a",
        "good",
        "bad",
        "movie",
        "was",
        "is",
        "very",
        "not",
        "i",
        "it",
        "love",
        "hate",
    ]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(path)
    return fast, len(words)


def _tiny_bert(path, num_labels, id2label=None):
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer, vocab = _tiny_tokenizer(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
        **({"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}),
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    return model, tokenizer


TEXTS = ["the movie was very good", "i hate it", "not bad", "a"]


def test_hf_classifier_from_local_directory(tmp_path):
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    model, tokenizer = _tiny_bert(tmp_path, 3, labels)
    pot = HFClassifierPotential(tmp_path, label="Positive", batch_size=3)
    assert pot.bounded and pot.classes == ("negative", "neutral", "positive") and pot.label_index == 2
    got = pot(seqs_of(TEXTS))
    with torch.inference_mode():
        want = [
            torch.log_softmax(model(**tokenizer([t], return_tensors="pt")).logits[0].double(), -1)[2] for t in TEXTS
        ]
    assert torch.allclose(got, torch.stack(want), atol=1e-5)  # padded batches match one-by-one
    assert torch.allclose(pot.class_log_probs(TEXTS).exp().sum(1), torch.ones(4, dtype=torch.float64))
    by_index = potential_from_spec(f"classifier:{tmp_path}:0")
    assert by_index.name.endswith(":negative")
    with pytest.raises(ConfigError, match="give a label"):
        HFClassifierPotential(tmp_path)
    with pytest.raises(ConfigError, match="unknown label"):
        HFClassifierPotential(tmp_path, label="angry")


def test_hf_single_logit_classifier_is_a_sigmoid(tmp_path):
    model, tokenizer = _tiny_bert(tmp_path, 1)
    pos, neg = HFClassifierPotential(tmp_path, label="positive"), HFClassifierPotential(tmp_path, label=0)
    seqs = seqs_of(TEXTS)
    assert torch.allclose(pos(seqs).exp() + neg(seqs).exp(), torch.ones(4, dtype=torch.float64))
    with torch.inference_mode():
        z = model(**tokenizer(TEXTS[:1], return_tensors="pt")).logits[0, 0].double()
    assert abs(float(pos(seqs)[0]) - float(torch.nn.functional.logsigmoid(z))) < 1e-5


def test_hf_classifier_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        HFClassifierPotential(tmp_path / "missing", label=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load classifier"):
        HFClassifierPotential(tmp_path / "empty", label=0)


@pytest.mark.model
def test_hf_llama_classifier_with_smol_tokenizer(tmp_path, smol):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = smol.tokenizer
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    pot = HFClassifierPotential(tmp_path)  # binary: class 1 by default
    texts = ["Hello there, how are you today?", "Fine.", "A much longer sentence about nothing in particular."]
    batched = pot(seqs_of(texts))
    single = torch.cat([pot(seqs_of([t])) for t in texts])
    assert torch.allclose(batched, single, atol=1e-5)  # padding does not change the pooled token
