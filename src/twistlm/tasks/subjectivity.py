"""``subjectivity``: a latent rationale z between a movie-review sentence x and its observed label y.

Prompt (per example)::

    Is the following movie review sentence objective or subjective?
    Review: "<text>"
    Explanation:

The model writes a one-sentence explanation z (the latent; the particle finishes at the end of the sentence —
``stop_token_ids`` = sentence-ending tokens — or at T, default 24). The label is then observed as the text
y = ``"\\nJudgment: This review is <objective|subjective>."`` and the potential is the likelihood of that observation,
φ(z) = p0(y | x, z) (:class:`~twistlm.potentials.InfillingPotential` with ``extras["observation"]`` one per example).
So σ(z) ∝ p0(z | x) p0(y | x, z) is the posterior over rationales that explain the true label (the GFlowNet paper's
latent-reasoning setting for SUBJ).

Data: ``data=PATH`` a SUBJ JSONL (``twistlm.data.load_subj``: ``{"text", "label": 0|1}``), from ``index``; without a
file, built-in example sentences (hand-written). Extras: ``observation`` (y text), ``label`` (0/1).

Goal (:func:`success`): the rationale makes the model judge correctly, p0(y_true | x, z) > p0(y_other | x, z) where
y_other is the observation with the other label — the classification accuracy of "reason, then judge".

Answers (``twistlm solve``, :data:`ANSWERS`): the completion is a rationale, not a label, so its answer is the label
the model judges after it, argmax_l p0(y_l | x, z) (``"objective"`` or ``"subjective"``; the lower label on a tie;
never unparsed); the gold answer is the example's label name.
"""

from __future__ import annotations

from twistlm.data import SUBJ_LABEL_NAMES, load_subj
from twistlm.lm import ParticleLM
from twistlm.potentials import InfillingPotential
from twistlm.potentials.likelihood import OBSERVATION_KEY, ContinuationScorer
from twistlm.target import Target
from twistlm.tasks.common import Option, define_task, select_examples, sentence_end_token_ids, text_ids
from twistlm.tasks.registry import Answers

DEFAULT_MAX_NEW_TOKENS = 24
LABEL_KEY = "label"
INSTRUCTION = "Is the following movie review sentence objective or subjective?"
OBSERVATION_TEMPLATE = "\nJudgment: This review is {label}."

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
}


def prompt_for(text: str) -> str:
    """The prompt x for a review sentence."""
    return f'{INSTRUCTION}\nReview: "{text}"\nExplanation:'


def observation_for(label: int) -> str:
    """The observed label text y for label 0 (objective) / 1 (subjective)."""
    return OBSERVATION_TEMPLATE.format(label=SUBJ_LABEL_NAMES[label])


DEMO_SEPARATOR = "\n\n"


class SubjFormat:
    """The task's prompt and observation as a :class:`~twistlm.classify.LabelFormat`: classifying by
    p0(y_l | x, z) normalised over the two labels is the task's own judgment (:func:`read_answers`)."""

    label_names = SUBJ_LABEL_NAMES
    max_rationale_tokens = DEFAULT_MAX_NEW_TOKENS

    def rationale_stop_ids(self, lm: ParticleLM) -> tuple[int, ...]:
        return sentence_end_token_ids(lm)

    def prompt(self, text: str) -> str:
        return prompt_for(text)

    def verbalizer(self, label: int) -> str:
        return observation_for(label)

    def demo(self, text: str, label: int) -> str:
        return prompt_for(text) + observation_for(label) + DEMO_SEPARATOR


LABEL_FORMAT = SubjFormat()


def build(lm: ParticleLM, T: int, B: int, *, data: str | None, index: int) -> Target:
    if data is not None:
        rows = [
            (e.text, e.label) for e in select_examples("subjectivity", load_subj(data, limit=index + B), index, B, data)
        ]
    else:
        rows = select_examples("subjectivity", BUILTIN_EXAMPLES, index, B, "the built-in example list")
    return Target(
        lm,
        prompts=[prompt_for(text) for text, _ in rows],
        potential=InfillingPotential(lm),
        max_new_tokens=T,
        stop_token_ids=sentence_end_token_ids(lm),
        extras={
            OBSERVATION_KEY: [observation_for(label) for _, label in rows],
            LABEL_KEY: [label for _, label in rows],
        },
    )


def label_log_likelihoods(target: Target, texts: list[str], prompt_index: list[int]):
    """(N, 2) log p0(y_l | x, z) for both labels l = 0, 1 of each rationale z (re-tokenized from its text)."""
    import torch

    lm = target.lm
    scorer = ContinuationScorer(lm, cache_size=max(1, target.num_prompts))
    obs = [text_ids(lm, observation_for(label)) for label in range(len(SUBJ_LABEL_NAMES))]
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
    DEFAULT_MAX_NEW_TOKENS,
    success,
    answer=ANSWERS,
)
