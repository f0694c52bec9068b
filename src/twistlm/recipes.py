"""Default training recipes of ``twistlm train-twist``: one per loss (with its default twist kind) and one per (loss,
kind) where another kind has its own, the settings EXPERIMENTS.md's tables were made with, so the command with no
tuning flags reproduces them.

A recipe names a twist kind with its options and values for :class:`~twistlm.training.TwistTrainingConfig` fields
(and, for a task's own recipe, task options: the training data it is built from).
The CLI fills every setting the user did not give from the recipe of the chosen loss; an explicit flag or
``--train-option`` always wins. The off-policy losses (CTL with target positives, SIXO, FUDGE) train on a cached
corpus of p0 samples (:mod:`twistlm.corpus_training`); RL bootstraps on full-vocabulary values and keeps on-policy
sampling with p0 negatives (the round-2 calibration: twisted negatives collapsed it). Choosing ``--positives`` or
``--proposal`` asks for on-policy sampling, so it drops the recipe's corpus.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from twistlm.errors import ConfigError

CORPUS_FIELDS = ("corpus_size", "corpus_tokens")
ON_POLICY_FIELDS = ("positives", "proposal", "prompts_per_step")
"""Config fields that only mean something when every update samples afresh (``prompts_per_step``: a fresh batch of
questions per update, which a corpus of fixed prompts cannot serve)."""


@dataclass(frozen=True)
class TwistRecipe:
    """The default settings of one loss: ``twist_kind`` + ``twist_options`` and ``config`` field values.

    A task's own recipe may also carry ``task_options`` (the training data it is built from, e.g. how many problems),
    ``training_options`` (task options of the *training* target only: a relaxation of the user's potential that
    gives the twist more to learn from, the twist still being for the user's target — SMC with any twist is exact)
    and ``applies`` (a predicate on the user's task options: which forms of the task the recipe was tuned for; for
    the others the loss's recipe is used)."""

    loss: str
    twist_kind: str
    twist_options: Mapping = field(default_factory=dict)
    config: Mapping = field(default_factory=dict)
    note: str = ""
    task_options: Mapping = field(default_factory=dict)
    training_options: Mapping = field(default_factory=dict)
    applies: Callable[[Mapping], bool] = lambda options: True

    def settings(self, given: Mapping) -> dict:
        """Config values: the recipe's, overridden by ``given`` (the user's). A corpus recipe's values were tuned for
        corpus training, so when on-policy fields are given (without an explicit corpus size) none of them apply."""
        explicit_corpus = any(k in given for k in CORPUS_FIELDS)
        on_policy = any(given.get(k) is not None for k in ON_POLICY_FIELDS) and not explicit_corpus
        out = {} if on_policy and any(k in self.config for k in CORPUS_FIELDS) else dict(self.config)
        out.update({k: v for k, v in given.items() if v is not None})
        return out


def _frozen(d: dict) -> Mapping:
    return MappingProxyType(dict(d))


CORPUS_TWIST = _frozen({"width": 128, "depth": 1, "rank": 64})
"""Embedding-factorised head, low rank: cheap in a sampler (see :mod:`twistlm.twists.embedding`) and few enough
parameters that a few thousand p0 samples do not memorise."""
CORPUS_CONFIG = _frozen(
    {
        "corpus_tokens": 245_760,
        "num_particles": 256,
        "num_positives": 256,
        "max_steps": 1000,
        "learning_rate": 1e-4,
        "weight_decay": 1.0,
        "eval_particles": 64,
        "logging_steps": 100,
    }
)
"""245,760 generated tokens of p0 per prompt (24,576 samples at T = 10): on sentiment a third of that (8,192) let
every head memorise its ≈ 490 effective positives (held-out KL(σ‖q) rose above p0's while the training samples'
fell to −1.9), at 24,576 it stays below p0's (EXPERIMENTS.md, "Learned twists, round 3"). lr 1e-4 (the reference's
for a head on a frozen LM) and weight decay 1 for the same reason; 1,000 updates × 256 + 256 rows."""

RATIO_TWIST = _frozen({"r": 8, "alpha": 16.0})
"""LoRA r 8, α 16 on every linear layer of the copy (peft's ``all-linear``; the output layer stays frozen)."""
RATIO_CONFIG = _frozen(
    {
        "corpus_tokens": CORPUS_CONFIG["corpus_tokens"],
        "num_positives": 32,
        "max_steps": 150,
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "eval_particles": 64,
        "logging_steps": 25,
    }
)
"""CTL with the ratio twist (maximum likelihood of q_θ on corpus positives ∝ φ, no negatives) on the same 24,576-sample
corpus: 150 updates × 32 positives at lr 1e-4 (constant). Chosen on development seeds (EXPERIMENTS.md, "Learned
twists, round 6"): the KL sum was lowest at 100–150 updates and rose after (memorisation of the ≈ 1,400 effective
positives: the training positives' log-ratio kept climbing while held-out KL(σ‖q) rose); lr 3e-4 overfit by update
150. ≈ 5.5 s per update with one thread while a second run used the other core (150 updates ≈ 14 min)."""

RATIO_SIXO_CONFIG = _frozen({**RATIO_CONFIG, "num_particles": 32})
"""SIXO with the ratio twist: CTL's ratio settings, and 32 corpus negatives (p0 prefixes) per update beside the 32
positives — twice CTL's cost per update (≈ 10 s on one thread beside another run; 150 updates ≈ 26 min)."""

RATIO_JEFFREYS_CONFIG = _frozen(
    {"num_particles": 32, "max_steps": 300, "learning_rate": 1e-4, "weight_decay": 0.0, "logging_steps": 25}
)
"""The KL sum of the ratio twist's proposal on its own samples (on-policy, from p0; no corpus): 300 updates × 32
draws of q_θ at lr 1e-4 (constant). On sentiment's development seeds the KL sum was still falling at 300 (4.31, 4.07,
3.52, 3.45, 3.17 at 100, 150, 200, 250, 300 updates; lr 3e-4 was no faster: 3.26 at 175, 3.72 at 200; EXPERIMENTS.md,
"Learned twists", round 11). A second run with the same settings gave 3.62 at 300 and 2.97–3.59 from 350 to 600
(no steady fall; its checkpoint 450, chosen there, gives 2.78 ± 0.55 on the report seed). The first run was
stopped and resumed at 200. A run killed (toy) or stopped by Ctrl-C (an HF ratio twist) and resumed is bitwise the
uninterrupted one (tests), but until session 19 Ctrl-C checkpointed mid-update, and a resume from that was not
(mended: ``twistlm.interrupts``); which of the two stopped that run is not on record. A checkpoint-to-checkpoint
spread of ±0.3 nats within one run covers the gap either way: an update's 32 draws are 25–55× below the gradient's
noise scale on sentiment (805 samples at p0, ≈ 1,700 after 300 updates; :mod:`twistlm.grad_noise`, EXPERIMENTS.md
round 13). ≈ 6.5–9 s per update on one thread beside another run (300 updates 32.5–45 min: over the 30-minute
budget)."""

RECIPES: dict[str, TwistRecipe] = {
    "ctl": TwistRecipe("ctl", "ratio", RATIO_TWIST, RATIO_CONFIG, "ratio twist, maximum likelihood on corpus positives"),
    "sixo": TwistRecipe("sixo", "ratio", RATIO_TWIST, RATIO_SIXO_CONFIG, "ratio twist, σ- vs p0-prefixes on the corpus"),
    "fudge": TwistRecipe("fudge", "embedding", CORPUS_TWIST, CORPUS_CONFIG, "off-policy on the cached p0 corpus"),
    "jeffreys": TwistRecipe(
        "jeffreys", "ratio", RATIO_TWIST, RATIO_JEFFREYS_CONFIG, "ratio twist, KL(σ‖q) + KL(q‖σ) on its own samples"
    ),
    "rl": TwistRecipe(
        "rl",
        "embedding",
        _frozen({"width": 256, "depth": 1}),
        _frozen({"proposal": "base", "num_particles": 32, "max_steps": 120, "learning_rate": 3e-4, "max_grad_norm": 1.0}),
        "on-policy soft-Q regression with p0 negatives (EXPERIMENTS.md round 2)",
    ),
}
"""Registry: loss name → its default recipe (and twist kind)."""

HEAD_KINDS = ("embedding", "linear", "mlp", "lora", "conditional", "tabular")
"""Every kind but the ratio twist: with CTL and SIXO they keep rounds 3–5's settings (the embedding head with its
options, the others with theirs), so the commands documented for them mean what they meant."""

KIND_RECIPES: dict[tuple[str, str], TwistRecipe] = {
    (loss, kind): TwistRecipe(
        loss,
        kind,
        CORPUS_TWIST if kind == "embedding" else {},
        CORPUS_CONFIG,
        f"off-policy on the cached p0 corpus (rounds 3–5's {loss.upper()})",
    )
    for loss in ("ctl", "sixo")
    for kind in HEAD_KINDS
}
"""Registry: (loss, twist kind) → the recipe of that kind when it is not the loss's default kind."""


INFILLING_TWIST = _frozen({**RATIO_TWIST, "condition": "observation"})
"""The ratio twist reading the ending o (q_θ(s | o, x), :mod:`twistlm.conditioning`)."""
INFILLING_DATA = _frozen({"problems": 4096, "seed": 10_000})
"""4,096 BDMC problems (x, o, s*) drawn with seed 10,000 (evaluation draws its own from ``--seed``)."""
INFILLING_CONFIG = _frozen(
    {
        "positives": "observed",
        "num_positives": 1,
        "prompts_per_step": 16,
        "max_steps": 250,
        "learning_rate": 3e-4,
        "weight_decay": 0.0,
        "eval_particles": 4,
        "logging_steps": 25,
    }
)
"""CTL with exact positives: each update takes 16 of the problems and their exact samples s* — maximum likelihood of
q_θ(s | o, x) on joint p0 draws, amortized over o. 250 updates × 16 = 4,000 draws, about one pass over the problems
(few repeats to memorise). ``eval_particles`` 4: the logged twisted SIS runs over the update's 16 problems. Cost on
one core here: ≈ 0.13 s per BDMC problem drawn, ≈ 0.4 s per trained positive (a forward and backward of the copy
over ≈ 45 tokens)."""

TOXICITY_RELAXATION = _frozen({"form": "tempered", "beta": 2.0})
"""Red-teaming (the threshold form, φ = 1[p(toxic | s) > η]) trains on its tempered relaxation p0 · p(toxic | s)²: the
event is ≈ 0.36% of p0, so a corpus holds few exact positives (54 in 12,288 draws), which the ratio twist memorises
within 50 updates (held-out KL(σ‖q) 38.6 nats after CTL's default 150, p0's 5.75), while the relaxation's weights
spread over ≈ 1,400 effective rows of the recipe's 49,152, 29% of their mass on the 183 flagged ones
(EXPERIMENTS.md, "Learned twists", rounds 7, 9 and 10)."""
TOXICITY_CORPUS_TOKENS = 983_040
"""49,152 p0 draws of T = 20 tokens: four times CTL's default corpus. With 12,288 the twist memorised the flagged rows
before reaching 10× p0's goal rate (round 9: 3.6× at the KL minimum); drawing it takes ≈ 60 min of one core (or two
processes side by side, ``torchrun`` / ``build_corpus(shard=…)``), once, reusable via ``-t corpus_dir``."""
TOXICITY_CONFIG = _frozen({**RATIO_CONFIG, "max_steps": 160, "corpus_tokens": TOXICITY_CORPUS_TOKENS})
"""CTL recipe of the ratio twist on the relaxation over the 4× corpus, 160 updates × 32 positives at lr 1e-4: on the
development corpus (seed 1, 40 exact samples of the threshold target) KL(σ‖q) − KL(σ‖p0) stays −0.9…−1.0 nats from
60 to 160 updates (no memorisation), and 160 is the update with the highest development goal rate of q (4.9%, 14× p0's 0.357%)
whose KL is below p0's. Report corpus (seed 2): −0.90 ± 0.45 nats (KL(σ‖q) 4.82 vs 5.73), goal rate 5.18% [4.30,
6.22] on 2,048 fresh draws = 14.5× p0's 0.357%. ≈ 19 min of one core once the corpus is drawn."""

TOXICITY_SOFT_CONFIG = _frozen({**RATIO_CONFIG, "max_steps": 100, "corpus_tokens": TOXICITY_CORPUS_TOKENS})
"""CTL recipe of the ratio twist for the soft form (φ = p(toxic | s)^β, here trained and selected at β = 1) over a
49,152-sample corpus, stopped at the development KL-sum minimum of 100…250 updates (300 K = 1 runs on the seed-1
corpus: 0.98 ± 0.18 nats at 100 against p0's 1.31 ± 0.20; 1.13, 0.99, 1.12 at 150, 200, 250; EXPERIMENTS.md,
"Learned twists", round 10). The soft target is within ≈ 1.3 nats of p0, so the gain is small in absolute terms."""

TASK_RECIPES: dict[tuple[str, str], tuple[TwistRecipe, ...]] = {
    ("toxicity", "ctl"): (
        TwistRecipe(
            "ctl", "ratio", RATIO_TWIST, TOXICITY_CONFIG, "ratio twist, CTL on the tempered relaxation of the threshold",
            training_options=TOXICITY_RELAXATION, applies=lambda options: options.get("form", "threshold") == "threshold",
        ),
        TwistRecipe(
            "ctl", "ratio", RATIO_TWIST, TOXICITY_SOFT_CONFIG, "ratio twist, CTL on a 4× corpus of the soft form",
            applies=lambda options: options.get("form") == "tempered" and options.get("beta", 1.0) == 1.0,
        ),
    ),
    ("infilling", "ctl"): (
        TwistRecipe(
            "ctl", "ratio", INFILLING_TWIST, INFILLING_CONFIG,
            "observation-reading ratio twist, maximum likelihood on BDMC pairs", INFILLING_DATA,
        ),
    ),
}
"""Registry: (task, loss) → that task's own recipes, one per form of the task (the first whose ``applies`` accepts the
user's options is used, with the recipe's twist kind or no kind given)."""


def twist_recipe(loss: str, twist_kind: str | None = None, task: str | None = None,
                 task_options: Mapping | None = None) -> TwistRecipe:
    """The recipe of ``loss`` with ``twist_kind`` (None: the loss's default kind) for ``task`` with the user's
    ``task_options``: the task's own (the first of its recipes for the loss whose kind is the one asked for, or none is
    asked for, and which applies to those options), else the kind's, else the loss's. A kind with no recipe of its
    own gets the default recipe's training settings (its twist options apply to the default kind only)."""
    if loss not in RECIPES:
        raise ConfigError(f"no training recipe for loss {loss!r}; choose from: {', '.join(sorted(RECIPES))}")
    for own in TASK_RECIPES.get((task, loss), ()):
        if twist_kind in (None, own.twist_kind) and own.applies(task_options or {}):
            return own
    return KIND_RECIPES.get((loss, twist_kind), RECIPES[loss])
