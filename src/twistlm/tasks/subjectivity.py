"""``subjectivity``: a latent rationale z between a movie-review sentence x and its observed label y.

Two forms (option ``form``, registry :data:`FORMS`):

* ``sentence`` (default) — prompt ``Is the following movie review sentence objective or subjective?\nReview:
  "<text>"\nExplanation:``, z a one-sentence explanation (the particle finishes at the end of the sentence —
  ``stop_token_ids`` = sentence-ending tokens — or at T, default 24), then y = ``"\nJudgment: This review is
  <objective|subjective>."``;
* ``short`` — the GFlowNet paper's SUBJ format (REFERENCES (B)): ``Classify this movie review as objective or
  subjective: "<text>" This review is``, z a few words (T = 5) ending at a comma (or a sentence end), then
  y = ``" so it is <label>."`` — e.g. "… This review is a plot summary, so it is objective."

The potential is the likelihood of the observation, φ(z) = p0(y | x, z) (:class:`~twistlm.potentials.InfillingPotential`
with ``extras["observation"]`` one per example), so σ(z) ∝ p0(z | x) p0(y | x, z) is the posterior over rationales
that explain the true label (the GFlowNet paper's latent-reasoning setting for SUBJ). ``penalty=λ`` > 0 also divides
by e^λ the mass of every rationale after which the model prefers the other label
(:class:`~twistlm.potentials.JudgedObservationPotential`; the paper's E-step reward has λ = 50).

Data: ``data=PATH`` a SUBJ JSONL (``twistlm.data.load_subj``: ``{"text", "label": 0|1}``), from ``index``; without a
file, built-in example sentences (hand-written). Extras: ``observation`` (y text), ``alternatives`` (the other
label's y), ``label`` (0/1).

Goal (:func:`success`): the rationale makes the model judge correctly, p0(y_true | x, z) > p0(y_other | x, z) where
y_other is the observation with the other label — the classification accuracy of "reason, then judge".

Answers (``twistlm solve``, :data:`ANSWERS`): the completion is a rationale, not a label, so its answer is the label
the model judges after it, argmax_l p0(y_l | x, z) (``"objective"`` or ``"subjective"``; the lower label on a tie;
never unparsed); the gold answer is the example's label name.
"""

from __future__ import annotations

from dataclasses import dataclass

from twistlm.data import SUBJ_LABEL_NAMES, load_subj
from twistlm.lm import ParticleLM
from twistlm.potentials import InfillingPotential, JudgedObservationPotential
from twistlm.potentials.judged import ALTERNATIVES_KEY
from twistlm.potentials.likelihood import OBSERVATION_KEY, ContinuationScorer
from twistlm.target import Target
from twistlm.tasks.common import (
    Option,
    define_task,
    ends_sentence,
    select_examples,
    sentence_end_token_ids,
    text_ids,
    token_set,
)
from twistlm.tasks.registry import Answers

LABEL_KEY = "label"
FORM_KEY = "form"


@dataclass(frozen=True)
class RationaleForm:
    """How an example is written around its rationale z: ``prompt`` (with ``{text}``), z, then ``observation``
    (with ``{label}``). ``stop``: the text that ends a rationale — the one stop action of a GFlowNet policy, which
    must be a single token; ``max_tokens``: the default horizon T."""

    name: str
    prompt: str
    observation: str
    stop: str
    max_tokens: int

    def stop_token_ids(self, lm: ParticleLM) -> tuple[int, ...]:
        """Tokens that finish a rationale in the target: sentence ends, and for a comma form the clause ends too."""
        if self.stop == ".":
            return sentence_end_token_ids(lm)
        return token_set(lm, f"ends:{self.stop}", lambda t: ends_sentence(t) or t.rstrip().endswith(self.stop))


FORMS = {
    "sentence": RationaleForm(
        "sentence", 'Is the following movie review sentence objective or subjective?\nReview: "{text}"\nExplanation:',
        "\nJudgment: This review is {label}.", ".", 24),
    "short": RationaleForm(
        "short", 'Classify this movie review as objective or subjective: "{text}" This review is',
        " so it is {label}.", ",", 5),
}
"""Registry of forms (module docstring). ``short`` is REFERENCES (B)'s, whose rationales have 1 to 5 tokens."""
DEFAULT_FORM = "sentence"

BUILTIN_EXAMPLES = (
    ("a gorgeous , witty , seductive movie that never lets up .", 1),
    ("a retired detective is pulled back into one last case when his former partner disappears .", 0),
    ("the performances are stiff and the jokes fall flat .", 1),
    ("set in 1950s marseille , the film follows two brothers who run a small fishing boat .", 0),
)
"""(text, label) pairs used without a data file; label 0 objective, 1 subjective. Hand-written, in SUBJ's style."""

OPTIONS = {
    "data": Option(None, "SUBJ JSONL with {text, label} (e.g. subj/train.50.jsonl)", str, optional=True),
    "index": Option(0, "first example", int, minimum=0),
    "form": Option(DEFAULT_FORM, "how the rationale is written", str, choices=tuple(FORMS)),
    "penalty": Option(0.0, "nats taken from a rationale after which the model prefers the other label", float,
                      minimum=0.0),
}


def prompt_for(text: str, form: str = DEFAULT_FORM) -> str:
    """The prompt x for a review sentence."""
    return FORMS[form].prompt.format(text=text)


def observation_for(label: int, form: str = DEFAULT_FORM) -> str:
    """The observed label text y for label 0 (objective) / 1 (subjective)."""
    return FORMS[form].observation.format(label=SUBJ_LABEL_NAMES[label])


DEMO_SEPARATOR = "\n\n"


class SubjFormat:
    """A form's prompt and observation as a :class:`~twistlm.classify.LabelFormat`: classifying by
    p0(y_l | x, z) normalised over the two labels is the task's own judgment (:func:`read_answers`)."""

    label_names = SUBJ_LABEL_NAMES

    def __init__(self, form: str = DEFAULT_FORM):
        self.form = form
        self.max_rationale_tokens = FORMS[form].max_tokens

    def rationale_stop_ids(self, lm: ParticleLM) -> tuple[int, ...]:
        return FORMS[self.form].stop_token_ids(lm)

    def prompt(self, text: str) -> str:
        return prompt_for(text, self.form)

    def verbalizer(self, label: int) -> str:
        return observation_for(label, self.form)

    def demo(self, text: str, label: int) -> str:
        return prompt_for(text, self.form) + observation_for(label, self.form) + DEMO_SEPARATOR


LABEL_FORMATS = {name: SubjFormat(name) for name in FORMS}
LABEL_FORMAT = LABEL_FORMATS[DEFAULT_FORM]


def build(lm: ParticleLM, T: int | None, B: int, *, data: str | None, index: int, form: str, penalty: float) -> Target:
    if data is not None:
        rows = [
            (e.text, e.label) for e in select_examples("subjectivity", load_subj(data, limit=index + B), index, B, data)
        ]
    else:
        rows = select_examples("subjectivity", BUILTIN_EXAMPLES, index, B, "the built-in example list")
    spec = FORMS[form]
    labels = range(len(SUBJ_LABEL_NAMES))
    return Target(
        lm,
        prompts=[prompt_for(text, form) for text, _ in rows],
        potential=JudgedObservationPotential(lm, penalty) if penalty > 0 else InfillingPotential(lm),
        max_new_tokens=spec.max_tokens if T is None else T,
        stop_token_ids=spec.stop_token_ids(lm),
        extras={
            OBSERVATION_KEY: [observation_for(label, form) for _, label in rows],
            ALTERNATIVES_KEY: [[observation_for(other, form) for other in labels if other != label] for _, label in rows],
            LABEL_KEY: [label for _, label in rows],
            FORM_KEY: [form for _ in rows],
        },
    )


def label_log_likelihoods(target: Target, texts: list[str], prompt_index: list[int]):
    """(N, 2) log p0(y_l | x, z) for both labels l = 0, 1 of each rationale z (re-tokenized from its text)."""
    import torch

    lm = target.lm
    scorer = ContinuationScorer(lm, cache_size=max(1, target.num_prompts))
    form = (target.extras.get(FORM_KEY) or [DEFAULT_FORM])[0]
    obs = [text_ids(lm, observation_for(label, form)) for label in range(len(SUBJ_LABEL_NAMES))]
    spans = [text_ids(lm, t) for t in texts]
    prompts = [target.prompt_ids[b] for b in prompt_index]
    out = torch.zeros(len(texts), len(obs), dtype=torch.float64)
    for label, o in enumerate(obs):
        out[:, label] = scorer(prompts, [s + o for s in spans], [len(s) for s in spans])
    return out


def success(target: Target, texts: list[str], prompt_index: list[int]) -> list[bool]:
    """The goal: after the rationale the true label is more likely than the other one."""
    if not texts:
        return []
    ll = label_log_likelihoods(target, texts, prompt_index)
    labels = target.extras[LABEL_KEY]
    return [bool(ll[i, labels[b]] > ll[i, 1 - labels[b]]) for i, b in enumerate(prompt_index)]


def read_answers(target: Target, texts: list[str], prompt_index: list[int]) -> list[str | None]:
    """The label the model judges after each rationale: the name of argmax_l p0(y_l | x, z)."""
    if not texts:
        return []
    ll = label_log_likelihoods(target, texts, prompt_index)
    return [SUBJ_LABEL_NAMES[int(i)] for i in ll.argmax(dim=1)]


def gold_answers(target: Target) -> list[str]:
    """The label name of each example."""
    return [SUBJ_LABEL_NAMES[label] for label in target.extras[LABEL_KEY]]


def problem_count(*, data: str | None, **_: object) -> int:
    """Examples in the data file (or the built-in list without one)."""
    return len(BUILTIN_EXAMPLES) if data is None else len(load_subj(data))


ANSWERS = Answers(read=read_answers, gold=gold_answers, count=problem_count)

TASK = define_task(
    "subjectivity",
    "Latent rationale z between a SUBJ review and its label y: φ(z) = p0(y | x, z).",
    OPTIONS,
    build,
    " or ".join(f"{f.max_tokens} (form={name})" for name, f in FORMS.items()),
    success,
    answer=ANSWERS,
)
