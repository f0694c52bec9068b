"""A dataset of prompts for twist training and search: rows with a prompt (or question) and an answer, as TRL takes.

:class:`PromptDataset` reads what ``trl.GRPOTrainer`` reads: a ``datasets.Dataset`` or any sequence of dicts, one
row per problem, with

* ``prompt``: the prompt, text (continued as is) or chat messages (``[{"role": ..., "content": ...}, ...]``, rendered
  with the model's chat template); or, without a ``prompt`` column,
* ``question``: text turned into the prompt by ``make_prompt(question)`` (default: the text itself; the ``gsm8k``
  task passes its system prompt + question as chat messages);
* ``answer``: required (the rewards grade against it); any value the potential understands (a GSM8K answer with
  ``#### <gold>``, a number, ...);
* any other column: kept as well. Every column but the prompt reaches the potential as ``target.extras`` — so TRL
  reward functions ``f(prompts, completions, **kwargs)`` receive ``answer=[...]`` and the other columns as keyword
  lists, as under ``GRPOTrainer``.

Bad rows are refused with one line (:class:`~twistlm.errors.ConfigError`) naming the row (1-based): no answer, no
prompt or question, a prompt that is neither text nor messages, a column missing from some rows, a column named like
TRL's reserved arguments; so is an empty dataset, and (in :meth:`PromptDataset.target`) a prompt whose tokens plus the
horizon T exceed the model's context.

Dev split (:meth:`PromptDataset.part`, :data:`PARTS`): deterministic, no randomness — ``dev`` is the **last**
``dev_size`` rows in file order, ``train`` all rows before them, ``all`` every row. The ``gsm8k`` task exposes it as
``-o part=train|dev|all -o dev_size=N`` (default 500: rows 6974–7473 of the 7,473-row train.jsonl are the dev split).

Per-update batches (:class:`PromptBatches`): the twist trainer (``prompts_per_step = P > 0``) builds one
:class:`~twistlm.target.Target` over every training prompt and, at the start of each update, draws P distinct rows
uniformly without replacement — the first P entries of ``torch.randperm(n, generator=trainer.generator)`` — and trains
on ``target.select(rows)``: the same potential, horizon and stop tokens, the extras (answers) of those rows. The draw
goes through the trainer's generator, which every checkpoint stores, so a resumed run draws the same questions as an
uninterrupted one. A twist that reads the LM's hidden state (linear, mlp, embedding, lora) conditions on the question
through it, so one twist serves questions it never saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from twistlm.errors import ConfigError, PromptTooLongError
from twistlm.lm import ParticleLM, Prompt
from twistlm.potentials.rewards import RESERVED_KWARGS
from twistlm.target import Target

if TYPE_CHECKING:  # pragma: no cover
    from twistlm.training import TwistTrainingConfig

PROMPT_COLUMN = "prompt"
QUESTION_COLUMN = "question"
ANSWER_COLUMN = "answer"
DEFAULT_SOURCE = "the dataset"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def _check_prompt(prompt: Any, where: str) -> Prompt:
    """Text, or a non-empty list of ``{"role": str, "content": str}`` messages."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        messages = []
        for m in prompt:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ConfigError(f"{where}: every chat message needs string 'role' and 'content', got {m!r:.80}")
            messages.append({"role": m["role"], "content": m["content"]})
        return messages
    raise ConfigError(f"{where}: the prompt must be text or a list of chat messages, got {_describe(prompt)}")


@dataclass(frozen=True)
class PromptDataset:
    """Prompts and per-row columns (``extras``: the answer and every other column but the prompt), row i ↔ prompt i.

    Build it with :meth:`from_rows`; ``source`` names the data in error messages; ``first_row`` is the 1-based row
    number of ``prompts[0]`` in that source (so that parts and slices keep naming rows as the file numbers them).
    """

    prompts: tuple[Prompt, ...]
    extras: dict[str, list[Any]] = field(default_factory=dict)
    source: str = DEFAULT_SOURCE
    first_row: int = 1

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Mapping[str, Any]],
        *,
        make_prompt: Callable[[str], Prompt] | None = None,
        answer_column: str = ANSWER_COLUMN,
        source: str = DEFAULT_SOURCE,
    ) -> PromptDataset:
        """Read a ``datasets.Dataset`` or a sequence of dicts (module docstring); ConfigError naming a bad row."""
        prompts: list[Prompt] = []
        extras: dict[str, list[Any]] | None = None
        for n, row in enumerate(rows, start=1):
            where = f"{source}, row {n}"
            if not isinstance(row, Mapping):
                raise ConfigError(f"{where}: expected a dict of columns, got {_describe(row)}")
            if row.get(answer_column) is None:
                raise ConfigError(f"{where} has no {answer_column!r} (every row needs one: the rewards grade against it)")
            if row.get(PROMPT_COLUMN) is not None:
                prompt_key = PROMPT_COLUMN
                prompt = _check_prompt(row[PROMPT_COLUMN], where)
            elif row.get(QUESTION_COLUMN) is not None:
                prompt_key = QUESTION_COLUMN
                question = row[QUESTION_COLUMN]
                if not isinstance(question, str):
                    raise ConfigError(f"{where}: {QUESTION_COLUMN!r} must be text, got {_describe(question)}")
                prompt = _check_prompt(make_prompt(question) if make_prompt is not None else question, where)
            else:
                raise ConfigError(f"{where} has neither {PROMPT_COLUMN!r} nor {QUESTION_COLUMN!r}")
            columns = {k: v for k, v in row.items() if k != prompt_key}
            if extras is None:
                clash = sorted(set(columns) & set(RESERVED_KWARGS))
                if clash:
                    raise ConfigError(f"{source}: column {clash[0]!r} clashes with an argument TRL reward functions "
                                      "reserve; rename it")
                extras = {k: [] for k in columns}
            if set(columns) != set(extras):
                odd = min(set(columns) ^ set(extras))
                raise ConfigError(f"{where}: column {odd!r} is not in every row (rows must share their columns)")
            prompts.append(prompt)
            for k, v in columns.items():
                extras[k].append(v)
        if not prompts:
            raise ConfigError(f"{source} is empty: it has no rows to train or search on")
        return cls(tuple(prompts), extras or {}, source)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def answers(self) -> list[Any]:
        return list(self.extras.get(ANSWER_COLUMN, []))

    def row_number(self, i: int) -> int:
        """The 1-based row number of prompt ``i`` in the source."""
        return self.first_row + i

    def slice(self, start: int, stop: int | None = None) -> PromptDataset:
        """Rows ``start:stop`` (a contiguous range; row numbers kept); ConfigError if it is empty."""
        stop = len(self) if stop is None else min(stop, len(self))
        if not 0 <= start < stop:
            raise ConfigError(f"{self.source}: rows {start + 1}..{stop} hold no problem (it has {len(self)})")
        return dataclasses.replace(
            self,
            prompts=self.prompts[start:stop],
            extras={k: v[start:stop] for k, v in self.extras.items()},
            first_row=self.first_row + start,
        )

    def part(self, name: str, dev_size: int) -> PromptDataset:
        """The ``train``, ``dev`` or ``all`` rows (module docstring: dev = the last ``dev_size`` rows)."""
        if name not in PARTS:
            raise ConfigError(f"unknown part {name!r}; choose from: {', '.join(PARTS)}")
        if isinstance(dev_size, bool) or not isinstance(dev_size, int) or dev_size < 0:
            raise ConfigError(f"dev_size must be an integer ≥ 0, got {dev_size!r}")
        return PARTS[name](self, dev_size)

    def target(self, template: Target) -> Target:
        """One Target over every row: the prompts and extras of the dataset, everything else (LM, potential,
        horizon, stop tokens, tool) from ``template`` — e.g. a task's target for its first problem. A prompt too long
        for the model's context is refused naming its row."""
        try:
            return dataclasses.replace(template, prompt=None, prompts=list(self.prompts), extras=dict(self.extras))
        except PromptTooLongError:
            raise self._too_long(template.lm, template.max_new_tokens) from None

    def as_target(self, lm: ParticleLM, potential: Any, max_new_tokens: int, **target_options: Any) -> Target:
        """``Target(lm, prompts=<the rows>, potential=potential, max_new_tokens=T, extras=<the columns>, ...)``."""
        try:
            return Target(lm, prompts=list(self.prompts), potential=potential, max_new_tokens=max_new_tokens,
                          extras=dict(self.extras), **target_options)
        except PromptTooLongError:
            raise self._too_long(lm, max_new_tokens) from None

    def _too_long(self, lm: ParticleLM, max_new_tokens: int) -> ConfigError:
        limit = lm.max_length
        for i, prompt in enumerate(self.prompts):
            size = len(lm.encode(prompt))
            if limit is not None and size + max_new_tokens > limit:
                return ConfigError(
                    f"{self.source}, row {self.row_number(i)}: the prompt has {size} tokens, which with "
                    f"max_new_tokens {max_new_tokens} exceeds the model's context of {limit} tokens (drop the row or "
                    "lower max_new_tokens)"
                )
        return ConfigError(f"{self.source}: a prompt is longer than the model's context")


def _all_rows(data: PromptDataset, dev_size: int) -> PromptDataset:
    return data


def _train_rows(data: PromptDataset, dev_size: int) -> PromptDataset:
    if dev_size >= len(data):
        raise ConfigError(f"{data.source}: dev_size {dev_size} leaves no training rows (it has {len(data)})")
    return data.slice(0, len(data) - dev_size)


def _dev_rows(data: PromptDataset, dev_size: int) -> PromptDataset:
    if dev_size == 0:
        raise ConfigError(f"{data.source}: the dev split is empty (dev_size=0)")
    if dev_size > len(data):
        raise ConfigError(f"{data.source}: dev_size {dev_size} exceeds its {len(data)} rows")
    return data.slice(len(data) - dev_size)


PARTS: dict[str, Callable[[PromptDataset, int], PromptDataset]] = {
    "all": _all_rows,
    "train": _train_rows,
    "dev": _dev_rows,
}
"""Registry: part name → the rows it keeps (dev = the last ``dev_size`` rows; train = the rows before them)."""


# ---------------------------------------------------------------------------------------------- per-update batches


def draw_rows(num_rows: int, size: int, generator: torch.Generator) -> list[int]:
    """``size`` distinct rows of ``num_rows``, uniformly without replacement: the first ``size`` entries of
    ``torch.randperm(num_rows, generator=generator)`` (in that random order)."""
    return torch.randperm(num_rows, generator=generator)[:size].tolist()


class PromptBatches:
    """The per-update question batches of dataset-level twist training (module docstring).

    ``target``: one Target over every training prompt (e.g. :meth:`PromptDataset.target`); ``size``: P, the
    questions per update. :meth:`draw` returns ``target.select(rows)`` for P fresh rows (and remembers ``rows``).
    """

    def __init__(self, target: Target, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"prompts_per_step must be a positive integer, got {size!r}")
        if size > target.num_prompts:
            raise ConfigError(
                f"prompts_per_step {size} exceeds the {target.num_prompts} prompts of the training data"
            )
        self.target, self.size = target, size
        self.rows: list[int] = []

    @classmethod
    def for_config(cls, target: Target, config: TwistTrainingConfig, twist: Any = None) -> PromptBatches | None:
        """The batches ``config.prompts_per_step`` asks for (None when it is 0: every update uses all of
        ``target``'s prompts); refuses settings that keep per-prompt state indexed by a prompt's position."""
        size = getattr(config, "prompts_per_step", 0)
        if not size:
            return None
        if config.corpus_size > 0 or config.corpus_tokens > 0:
            raise ConfigError("a cached corpus (corpus_size/corpus_tokens) holds samples of fixed prompts: it cannot be combined "
                              "with prompts_per_step")
        if config.positives == "buffer" and config.loss_spec.needs_positives:
            raise ConfigError("buffer positives keep a replay pool per prompt; with prompts_per_step use "
                              "positives=smc, rejection or exact")
        if getattr(twist, "per_prompt", False):
            raise ConfigError("a per-prompt tabular twist indexes prompts by position: it cannot train over batches "
                              "of questions (use linear, mlp, embedding, conditional or lora)")
        return cls(target, size)

    def draw(self, generator: torch.Generator) -> Target:
        """The target of the next update: P rows drawn with ``generator`` (:func:`draw_rows`)."""
        self.rows = draw_rows(self.target.num_prompts, self.size, generator)
        return self.target.select(self.rows)
