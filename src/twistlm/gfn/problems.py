"""From a task to a GFlowNet problem: the target over every training prompt, the action space, labelled
trajectories and the task's recipe defaults (registry ``PROBLEMS``; any other task gets :func:`generic_problem`).

* ``arithmetic`` — the GFlowNet paper's flagship. Training prompts: the labelled file ``data`` (its first
  ``labelled`` problems, with their rationales as given trajectories) followed by the answer-only ``homework`` file
  (default: ``homework.json`` beside ``data``). Target: the task's latent form (``form=latent``): rationales z up to
  ".", reward p0(x z "." " The answer is y."), the calculator on. Actions: tokens made only of digits, spaces and
  ``+ - = ,`` plus the stop "." (the reference's vocabulary restriction), 6 to 28 actions.
* ``infilling`` in BDMC mode (``twistlm evaluate``'s infilling problem): ``prompts`` (default
  :data:`BDMC_TRAIN_PROMPTS`) self-generated endings o of the prompt (drawn from :data:`BDMC_TRAIN_SEED` on), the
  policy reading o (condition
  ``observation``), exactly T actions (the target gives any other span length φ = 0), recipe :data:`EXACT_SPAN_RECIPE`;
  in stories mode (``data=``) the true 4th sentences are the labelled trajectories (:func:`true_middles`).
* ``subjectivity`` — rationales z of labelled SUBJ sentences (x, y), R(z ⊤) = p0(z ⊤ y | x) (``form=short``: minus
  50 nats when p0 then prefers the wrong label), the policy q(z | x) reading x only (it must infer y): the
  rationale sampler of latent-rationale EM (:mod:`twistlm.latent_em`).
  Stories infilling and subjectivity share :func:`sentence_space` (one stop action: "." or the short form's ",").
* any other task — its own target (``prompts`` = how many of its prompts, from ``index``), the full vocabulary, its
  stop tokens, 1 to T actions; a target with observations (``extras["observation"]``) gets a policy that reads them (:func:`~twistlm.conditioning.default_condition`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from twistlm.conditioning import default_condition
from twistlm.errors import ConfigError
from twistlm.gfn.rewards import reward_for
from twistlm.gfn.sampling import ActionSpace
from twistlm.gfn.trainer import GFNProblem, GivenTrajectory
from twistlm.lm import ParticleLM
from twistlm.target import Target
from twistlm.tasks.registry import get_task

ARITHMETIC_CHARACTERS = frozenset("0123456789+-=, ")
"""Characters of the arithmetic policy's action tokens (besides the stop token)."""
ARITHMETIC_MIN_LEN, ARITHMETIC_MAX_LEN = 6, 28
"""One step ("5 + 9 =") takes 6 actions; four operands with negative intermediates about 24."""
ARITHMETIC_TOKENS = 64
"""Horizon T of the latent arithmetic target (actions plus calculator tokens)."""
ARITHMETIC_REWARD_TEMPERATURE = (1.1, 0.5, 100)
"""Reward temperature ramp: log R / T_R, T_R from 1.1 to 0.5 (the reference recipe, REFERENCES (B)), over 100 steps
instead of its 150 (our runs are 80 updates, not 2000)."""
DEFAULT_LABELLED = 10
FINAL_REWARD_RECIPE = {"objective": "tb", "max_steps": 300, "tempered_prob": 0.0}
"""GFNConfig values for a target whose reward exists only at the final state (EXPERIMENTS.md, "GFlowNet policies as
proposals"): trajectory balance, since SubTB needs a reward at every prefix; 300 updates × 16 trajectories (one
log Z for every trajectory converges more slowly than SubTB's flows); no tempered behaviour (¾ on-policy, ¼ replay):
with τ ~ U[0.5, 2] half the updates went to text far from σ and TB did not converge (sentiment KL sum 6.41 vs 3.27)."""
DEFAULT_GENERIC_PROMPTS = 1
BDMC_TRAIN_PROMPTS = 256
"""Training endings of the BDMC infilling policy: each prompt is one BDMC draw (x, o), so the policy is amortized over
256 observations, each seen ≈ 5 times in 300 updates of 4 prompts."""
BDMC_TRAIN_SEED = 10_000
"""Default ``seed`` of the training draws: draw b uses seed + b, far from the seeds ``evaluate --seed`` draws its
held-out endings with, so the policy is measured on observations it was not trained on."""
EXACT_SPAN_RECIPE = {"objective": "vargrad", "max_steps": 300, "tempered_prob": 0.0, "replay_prob": 0.0}
"""GFNConfig values for BDMC infilling: the reward exists only at the final state, and with 256 observations seen a
few times each TB's per-prompt log Z table would lag behind, so log-variance (``vargrad``, log Z estimated per batch);
on-policy only (a prompt's replay buffer holds a handful of trajectories, often all alike: zero variance)."""
STORY_RECIPE = {"objective": "subtb", "learning_rate": 1e-4}
"""GFNConfig values for Story Cloze infilling: SubTB (the likelihood reward p0(z "." y | x) exists at every prefix)
at the reference's infilling learning rate 1e-4 (REFERENCES (B)); the other settings are the defaults, which are the
reference's exploration (¼ on-policy, ¼ replay seeded with the true sentences, ½ tempered). With the arithmetic
default 3e-4 the seventh session's run had a SubTB loss of 8,365 at update 11 (EXPERIMENTS.md, seventh session).
80 updates × 16 trajectories (the default): 31 min on one core here beside another run, seeding the buffer
included (one reward pass per generated token, up to 24)."""

ProblemBuilder = Callable[..., GFNProblem]
PROBLEMS: dict[str, ProblemBuilder] = {}


def register_problem(name: str):
    def deco(fn: ProblemBuilder) -> ProblemBuilder:
        PROBLEMS[name] = fn
        return fn

    return deco


def rationale_trajectory(lm: ParticleLM, rationale: str, tool: Any, stop_token: int) -> GivenTrajectory:
    """A calculator-style rationale ("6 - 0 =, 6 - 4 =") as the trajectory the policy would take: the text before
    each "=" (and the "=") as actions, the calculator's value after it forced, then the stop token."""
    tokens: list[int] = []
    forced: list[bool] = []
    pieces = [p for p in rationale.strip().split("=")][:-1]
    for k, piece in enumerate(pieces):
        text = (" " + piece.strip() if k == 0 else piece.rstrip()) + " ="
        acts = lm.tokenize(text)
        tokens += acts
        forced += [False] * len(acts)
        out = tool(lm.decode(tokens)) if tool is not None else None
        if out:
            value = lm.tokenize(out)
            tokens += value
            forced += [True] * len(value)
    return GivenTrajectory(tokens, forced, stop_token)


def _allowed(lm: ParticleLM, keep: Callable[[str], bool]) -> torch.Tensor:
    mask = torch.zeros(lm.vocab_size, dtype=torch.bool)
    for v in range(lm.vocab_size):
        text = lm.decode([v])
        mask[v] = bool(text) and keep(text)
    return mask


@register_problem("arithmetic")
def arithmetic_problem(lm: ParticleLM, *, data: str | None = None, homework: str | None = None,
                       labelled: int = DEFAULT_LABELLED, shots: int = 3, tool: bool = True, **unknown) -> GFNProblem:
    from twistlm.data import load_arithmetic
    from twistlm.tasks.arithmetic import Problem, latent_target, stop_token_id

    if unknown:
        raise ConfigError(f"train-gfn --task arithmetic has no option {min(unknown)!r}; "
                          "options: data, homework, labelled, shots, tool")
    if data is None:
        raise ConfigError("train-gfn --task arithmetic needs -o data=FILE (e.g. ../shared/data/arithmetic/train_50.json)")
    if homework is None:
        beside = Path(data).with_name("homework.json")
        homework = str(beside) if beside.is_file() else None
    examples = load_arithmetic(data)
    with_rationale = [e for e in examples if e.rationale]
    if labelled > len(with_rationale):
        raise ConfigError(f"labelled={labelled}, but {data} has only {len(with_rationale)} problems with rationales")
    chosen = with_rationale[:labelled]
    extra = load_arithmetic(homework) if homework else []
    if not chosen and not extra:
        raise ConfigError(f"{data} gives no training problems")
    problems = [Problem(e.query, e.solution) for e in chosen + extra]
    target = latent_target(lm, problems, shots=shots, tool=tool, max_new_tokens=ARITHMETIC_TOKENS)
    stop = stop_token_id(lm)
    allowed = _allowed(lm, lambda t: set(t) <= ARITHMETIC_CHARACTERS)
    given = {i: rationale_trajectory(lm, e.rationale, target.tool, stop) for i, e in enumerate(chosen)}
    for g in given.values():
        allowed[[t for t, f in zip(g.tokens, g.forced) if not f]] = True
    space = ActionSpace(allowed, (stop,), ARITHMETIC_MIN_LEN, ARITHMETIC_MAX_LEN, stop_after_tool=tool)
    info = {"task_options": {"form": "latent", "shots": shots, "tool": tool}, "max_new_tokens": ARITHMETIC_TOKENS,
            "train_problems": len(problems),
            "labelled": len(chosen), "homework": homework}
    return GFNProblem(target, space, given, ARITHMETIC_REWARD_TEMPERATURE, info)


def generic_problem(task_name: str, lm: ParticleLM, *, prompts: int = DEFAULT_GENERIC_PROMPTS,
                    **options: Any) -> GFNProblem:
    """Any registered task: ``prompts`` of its prompts as the training set, full vocabulary, its stop tokens, reward
    temperature 1 (the policy's goal is σ itself). A potential scored on complete sequences only (a classifier, a
    reward) gives no rewards at intermediate states, so the recipe is trajectory balance (:data:`FINAL_REWARD_RECIPE`)."""
    target = get_task(task_name).build(lm, num_prompts=prompts, **options)
    allowed = torch.ones(lm.vocab_size, dtype=torch.bool)
    space = ActionSpace(allowed, tuple(target.stop_ids), 1, target.max_new_tokens)
    recipe = {} if reward_for(target, space.stop_ids).prefix_defined else dict(FINAL_REWARD_RECIPE)
    return GFNProblem(target, space, {}, (1.0, 1.0, 1), {"task_options": options}, recipe,
                      condition=default_condition(target))


@register_problem("infilling")
def infilling_problem(lm: ParticleLM, *, prompts: int | None = None, **options: Any) -> GFNProblem:
    """BDMC mode: many endings, exactly T actions and its recipe; stories mode: the period as the one stop (module
    docstring). The policy reads the ending in both."""
    from twistlm.bdmc import ExactSpanPotential

    bdmc = options.get("mode") == "bdmc" or (options.get("mode") is None and options.get("data") is None)
    count = prompts if prompts is not None else (BDMC_TRAIN_PROMPTS if bdmc else DEFAULT_GENERIC_PROMPTS)
    if bdmc:
        options.setdefault("seed", BDMC_TRAIN_SEED)
    target = get_task("infilling").build(lm, num_prompts=count, **options)
    T, allowed = target.max_new_tokens, torch.ones(lm.vocab_size, dtype=torch.bool)
    info = {"task_options": options}
    if isinstance(target.potential, ExactSpanPotential):
        space = ActionSpace(allowed, tuple(target.stop_ids), T, T)
        return GFNProblem(target, space, {}, (1.0, 1.0, 1), info, dict(EXACT_SPAN_RECIPE), condition="observation")
    problem = GFNProblem(target, sentence_space(target), {}, (1.0, 1.0, 1), info, dict(STORY_RECIPE),
                         condition="observation")
    problem.given = true_middles(problem)
    info["labelled"] = len(problem.given)
    return problem


SUBJECTIVITY_RECIPE = {"objective": "subtb", "replay_prob": 0.5, "tempered_prob": 0.0, "learning_rate": 1e-4,
                       "max_len": 12}
"""GFNConfig values for the SUBJ rationale policy, sentence form: modified SubTB (the likelihood reward exists at
every prefix), the reference's SUBJ exploration (half on-policy, half replay) and learning rate 1e-4 (REFERENCES (B));
the stop forced after 12 actions (the reference's rationales have 5). With the arithmetic defaults (lr 3e-4) and 24
actions the policy drifted to long, p0-unlikely text within 40 updates (mean log R −63 → −99; EXPERIMENTS.md, ninth
session)."""
SHORT_SUBJECTIVITY_RECIPE = {"objective": "subtb", "replay_prob": 0.5, "tempered_prob": 0.0, "learning_rate": 5e-4,
                             "max_len": 5, "buffer_capacity": 100, "dedup_distance": 0.1, "max_steps": 200}
"""GFNConfig values for the short form (the reference's own SUBJ E-step, REFERENCES (B)): SubTB, half on-policy /
half replay (a buffer of 100 per sentence, duplicates within 0.1 edit distance, seeded by
:func:`wishful_rationales`), lr 5e-4, 1 to 5 actions before the stop ","; the reward's wrong-label penalty λ = 50
(:data:`SHORT_SUBJECTIVITY_PENALTY`). 200 updates × 16 rationales: 30 min here beside two or three other runs
(the reference: 1,000 × 512). Measured in EXPERIMENTS.md (round 5 of the GFlowNet policies): alone, the policy's
rationale makes p0 judge correctly 62% of the time (p0's own: 52%); as EM's rationale sampler, 0.813 and 0.829 at
50 labels (two seeds) against LoRA SFT's 0.849–0.863."""
SHORT_SUBJECTIVITY_PENALTY = 50.0
"""The reference's E-step reward subtracts 50 nats when p0, after the rationale, prefers the wrong label."""
WISHFUL_RATIONALES = 20
"""Buffer seeds per labelled sentence (short form), as in the reference: p0's continuations of
``prompt + " <label> because it is"``, cut at the first token that is not a word."""
WISHFUL_SEED = 20_000
"""Seed of the buffer-seed draws (fixed: the problem, hence a run, is a function of its options)."""
SEED_CHUNK_PROMPTS = 8
"""Prompts whose buffer seeds are drawn side by side."""


@register_problem("subjectivity")
def subjectivity_problem(lm: ParticleLM, *, prompts: int | None = None, **options: Any) -> GFNProblem:
    """Rationales for ``prompts`` labelled sentences (default: every row of ``data`` from ``index``, or the built-in
    examples), reward R(z ⊤) = p0(z ⊤ y | x) with y the sentence's own label and ⊤ the form's one stop action
    (:func:`sentence_space`: "." for ``form=sentence``, "," for ``form=short``, whose default ``penalty`` is the
    reference's 50 nats for a rationale after which p0 prefers the wrong label). The policy reads the sentence only
    (condition ``prompt``), as in the GFlowNet paper's E-step: amortized over many x, q(z | x) must write the
    rationale that explains a label it does not see, so on a new sentence it proposes rationales for the label it
    infers — what latent-rationale EM then predicts from (:mod:`twistlm.latent_em`)."""
    from twistlm.tasks.subjectivity import DEFAULT_FORM, FORMS, problem_count

    form = options.get("form", DEFAULT_FORM)
    short = form == "short"
    if short:
        options.setdefault("penalty", SHORT_SUBJECTIVITY_PENALTY)
    count = prompts if prompts is not None else problem_count(**options) - int(options.get("index", 0))
    if count < 1:
        raise ConfigError(f"no subjectivity examples from index {options.get('index', 0)}")
    target = get_task("subjectivity").build(lm, num_prompts=count, **options)
    info = {"task_options": options, "train_problems": count}
    recipe = SHORT_SUBJECTIVITY_RECIPE if short else SUBJECTIVITY_RECIPE
    problem = GFNProblem(target, sentence_space(target, FORMS[form].stop), {}, (1.0, 1.0, 1), info, dict(recipe))
    if short:
        problem.buffer_seeds = wishful_rationales(target, problem.space, int(recipe["max_len"]), WISHFUL_RATIONALES,
                                                  torch.Generator().manual_seed(WISHFUL_SEED))
        info["buffer_seeds"] = sum(len(v) for v in problem.buffer_seeds.values())
    return problem


def wishful_rationales(target: Target, space: ActionSpace, max_len: int, per_example: int,
                       generator: torch.Generator) -> dict[int, list[GivenTrajectory]]:
    """Plausible label-consistent rationales to seed the replay buffer (REFERENCES (B), SUBJ): for each labelled
    prompt x with label name y, ``per_example`` draws from p0 after ``x + " " + y + " because it is"``, cut before the
    first token that is not a word (letters or digits after optional spaces) and at ``max_len`` tokens, then used as
    rationales of x itself ("… This review is" + " a factual account" + ","). Empty draws and tokens outside the
    policy's space are left out; duplicates stay (the buffer removes them)."""
    from twistlm.data import SUBJ_LABEL_NAMES
    from twistlm.gfn.sampling import sample_trajectories
    from twistlm.tasks.subjectivity import LABEL_KEY

    lm = target.lm
    word = _allowed(lm, lambda t: t.strip().isalnum())
    prompts = [list(lm.encode(p + f" {SUBJ_LABEL_NAMES[y]} because it is"))
               for p, y in zip(target.prompts, target.extras[LABEL_KEY])]
    ends = tuple(int(v) for v in torch.nonzero(~word).flatten() if int(v) != lm.eos_token_id) + (lm.eos_token_id,)
    free = ActionSpace(torch.ones(lm.vocab_size, dtype=torch.bool), ends, 0, max_len)
    stop = space.stop_ids[0]
    out: dict[int, list[GivenTrajectory]] = {}
    for c in range(0, len(prompts), SEED_CHUNK_PROMPTS):
        trajs = sample_trajectories(lm, prompts[c : c + SEED_CHUNK_PROMPTS], per_example, free, generator)
        for i, toks in enumerate(trajs.tokens):
            if toks and bool(space.allowed[toks].all()):
                out.setdefault(c + trajs.prompt_index[i], []).append(GivenTrajectory(list(toks), [False] * len(toks), stop))
    return out


def sentence_space(target: Target, stop: str = ".") -> ActionSpace:
    """A one-sentence (or one-clause) latent: the full vocabulary but the target's other stop tokens, ``stop`` as the
    one stop action (:func:`stop_token`), 1 to T actions. One stop because the likelihood reward scores the
    observation after it (R(z ⊤) = p0(z ⊤ y | x)); the policy then covers the part of σ that ends on it or at T."""
    lm = target.lm
    allowed = torch.ones(lm.vocab_size, dtype=torch.bool)
    allowed[list(target.stop_ids)] = False  # other sentence ends would end the target's sentence too
    return ActionSpace(allowed, (stop_token(lm, stop),), 1, target.max_new_tokens)


def stop_token(lm: ParticleLM, text: str = ".") -> int:
    """The token of ``text`` ("." ends a story sentence, "," a short SUBJ rationale): the likelihood reward scores
    the observation after one stop token (R(z ⊤) = p0(z ⊤ y | x)); latents ending on another stop ("!", "?") are
    outside the policy's space."""
    ids = lm.tokenize(text)
    if len(ids) != 1:
        raise ConfigError(f"{text!r} is {len(ids)} tokens for this tokenizer; the policy's stop action must be one")
    return ids[0]


def true_middles(problem: GFNProblem) -> dict[int, GivenTrajectory]:
    """Story Cloze's true 4th sentences as trajectories (for ``sft``, and seeding the GFN's replay buffer as the
    reference does): the tokens of " " + sentence, its final sentence-end token as the stop; a sentence that does not
    end on a stop token or is longer than the policy's ``max_len`` actions is left out."""
    from twistlm.tasks.infilling import MIDDLE_KEY

    target, space = problem.target, problem.space
    given = {}
    for i, middle in enumerate(target.extras[MIDDLE_KEY]):
        ids = target.lm.tokenize(" " + str(middle).strip())
        if len(ids) >= 2 and ids[-1] in space.stop_ids and len(ids) - 1 <= space.max_len:
            given[i] = GivenTrajectory(ids[:-1], [False] * (len(ids) - 1), ids[-1])
    return given


def build_problem(task_name: str, lm: ParticleLM, **options: Any) -> GFNProblem:
    """The GFN problem of a task (module docstring)."""
    get_task(task_name)  # unknown task → one-line error
    if task_name in PROBLEMS:
        return PROBLEMS[task_name](lm, **options)
    return generic_problem(task_name, lm, **options)
