"""Shared plumbing of the built-in tasks: option specs and checking, data slicing, stop-token sets.

Options. Every task declares its options as ``{name: Option(default, help, kind, ...)}`` and registers itself with
:func:`define_task`. The resulting ``build(lm, max_new_tokens=None, num_prompts=1, **options)``

* rejects an unknown option with a :class:`~twistlm.errors.ConfigError` naming it and listing the allowed ones, and a
  bad value (wrong type, outside its choices or range) with one naming the option and what it accepts;
* carries an explicit signature (``inspect.signature(task.build)`` lists each option as a keyword-only parameter), so
  the CLI can reject unknown ``--task-option`` names before it loads a model.

Values may arrive as strings from the command line; the CLI already turns ``"3"`` into 3 and ``"true"`` into True,
and string options accept numbers (``data=123`` is the path ``"123"``).

Stop tokens. :func:`sentence_end_token_ids` and :func:`newline_token_ids` compute, once per tokenizer (cached), the
vocabulary entries that end a sentence or contain a line break; tasks pass them as ``Target.stop_token_ids`` so a
particle finishes when it completes a sentence (or a line), keeping that token in its text.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.target import Target
from twistlm.tasks.registry import Answers, Task, register_task

MAX_NUM_PROMPTS = 4096
"""Upper bound on ``num_prompts`` (B groups of K particles side by side)."""

SENTENCE_END_CHARACTERS = ".!?"
"""A token ends a sentence when its text, after trailing whitespace and closing quotes/brackets, ends with one of
these."""

CLOSING_CHARACTERS = "\"'”’»)]}"
"""Characters allowed after the sentence-ending punctuation inside the same token (``."``, ``?)``, ``!'``)."""


# ------------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One task option: default value, one-line help, accepted type and constraints.

    kind: ``str``, ``int``, ``float`` or ``bool``. choices: allowed values (None: any of the kind).
    minimum / maximum: inclusive bounds for numbers (``open_minimum``: the bound itself is excluded).
    optional: None is an accepted value (it means "not given"; e.g. no data path).
    """

    default: Any
    help: str
    kind: type = str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    optional: bool = False
    default_text: str | None = None
    """How ``twistlm tasks`` shows the default, when the value alone would mislead (e.g. a default chosen later)."""

    def describe(self) -> str:
        """The help text with the accepted values and default, for ``twistlm tasks``."""
        accepted = ""
        if self.choices is not None:
            accepted = "|".join(str(c) for c in self.choices)
        default = self.default_text or ("none" if self.default is None else self.default)
        return f"{self.help}" + (f" [{accepted}]" if accepted else "") + f" (default: {default})"


def _check_value(task: str, name: str, opt: Option, value: Any) -> Any:
    """``value`` converted to the option's kind, or ConfigError naming the option and what it accepts."""
    where = f"task {task!r}: option {name!r}"
    if value is None:
        if opt.optional:
            return None
        raise ConfigError(f"{where} needs a value")
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif opt.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif opt.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        value = float(value)
    elif opt.kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float, Path)):
            raise ConfigError(f"{where} must be text, got {value!r}")
        value = str(value)
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, opt.choices))}; got {value!r}")
    if opt.minimum is not None and (value < opt.minimum or (opt.open_minimum and value == opt.minimum)):
        relation = ">" if opt.open_minimum else "≥"
        raise ConfigError(f"{where} must be {relation} {opt.minimum:g}, got {value!r}")
    if opt.maximum is not None and value > opt.maximum:
        raise ConfigError(f"{where} must be ≤ {opt.maximum:g}, got {value!r}")
    return value


def check_options(task: str, spec: dict[str, Option], given: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``spec`` with its checked value (defaults filled in); ConfigError for unknown names."""
    unknown = sorted(set(given) - set(spec))
    if unknown:
        allowed = ", ".join(spec) or "(none)"
        raise ConfigError(f"task {task!r} has no option {unknown[0]!r}; its options: {allowed}")
    return {name: _check_value(task, name, opt, given.get(name, opt.default)) for name, opt in spec.items()}


def check_common(task: str, max_new_tokens: Any, num_prompts: Any) -> None:
    """Validate the two arguments every build takes (``max_new_tokens`` None means the task's default)."""
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        raise ConfigError(f"task {task!r}: max_new_tokens must be a positive integer or None, got {max_new_tokens!r}")
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or not 1 <= num_prompts <= MAX_NUM_PROMPTS:
        raise ConfigError(f"task {task!r}: num_prompts must be an integer in 1..{MAX_NUM_PROMPTS}, got {num_prompts!r}")


Builder = Callable[..., Target]
"""``builder(lm, T, B, **checked_options) -> Target`` with T the horizon (default applied) and B = num_prompts."""


def define_task(
    name: str,
    description: str,
    options: dict[str, Option],
    builder: Builder,
    default_max_new_tokens: int | str,
    success: Callable[[Target, list[str], list[int]], list[bool]] | None = None,
    answer: Answers | None = None,
    dataset: Callable[..., Any] | None = None,
    formatted: Callable[[Target, list[str], list[int]], list[bool]] | None = None,
) -> Task:
    """Register a task whose ``build`` checks ``options`` and calls ``builder(lm, T, B, **values)``.

    default_max_new_tokens: the default horizon, applied when ``max_new_tokens`` is None; or a text describing a
    default that depends on the options, in which case the builder receives T = None and applies it itself.
    answer: the task's :class:`~twistlm.tasks.registry.Answers`; its ``count`` is called with the checked options
        (defaults filled in), like the builder.
    dataset: ``dataset(**checked_options) -> PromptDataset`` (:attr:`~twistlm.tasks.registry.Task.dataset`), called
        with the checked options like the builder.
    formatted: see :attr:`~twistlm.tasks.registry.Task.formatted`.
    """

    def build(lm: ParticleLM, max_new_tokens: int | None = None, num_prompts: int = 1, **given: Any) -> Target:
        values = check_options(name, options, given)
        check_common(name, max_new_tokens, num_prompts)
        fixed_default = isinstance(default_max_new_tokens, int)
        horizon = default_max_new_tokens if max_new_tokens is None and fixed_default else max_new_tokens
        return builder(lm, horizon, num_prompts, **values)

    params = [
        inspect.Parameter("lm", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("max_new_tokens", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("num_prompts", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=1),
    ] + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=o.default) for k, o in options.items()]
    build.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    build.__name__ = f"build_{name}"
    build.__doc__ = f"Build the {name!r} target (default horizon T: {default_max_new_tokens}). Options:\n" + "\n".join(
        f"    {k}: {o.describe()}" for k, o in options.items()
    )
    help_texts = {k: o.describe() for k, o in options.items()}
    description = f"{description} Default horizon T: {default_max_new_tokens}."
    if answer is not None:
        count_checked = answer.count

        def count(**given: Any) -> int:
            return count_checked(**check_options(name, options, given))

        answer = Answers(read=answer.read, gold=answer.gold, count=count)
    checked_dataset = None
    if dataset is not None:

        def checked_dataset(**given: Any) -> Any:
            return dataset(**check_options(name, options, given))

    task = Task(name=name, description=description, build=build, success=success, options=help_texts, answer=answer,
                dataset=checked_dataset, formatted=formatted)
    task.default_max_new_tokens = default_max_new_tokens  # type: ignore[attr-defined]
    return register_task(task)


# --------------------------------------------------------------------------------------------------------- data


def select_examples(task: str, examples: Sequence[Any], index: int, num_prompts: int, source: str) -> list[Any]:
    """Examples ``index .. index + num_prompts − 1`` of ``examples``; ConfigError if that runs past the end."""
    if index + num_prompts > len(examples):
        raise ConfigError(
            f"task {task!r}: index {index} with num_prompts {num_prompts} needs {index + num_prompts} examples, "
            f"but {source} has {len(examples)}"
        )
    return list(examples[index : index + num_prompts])


def text_ids(lm: ParticleLM, text: str) -> list[int]:
    """Token ids of ``text`` on its own (no special tokens), as the likelihood potentials tokenize observations."""
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is not None:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(lm.encode(text))


# --------------------------------------------------------------------------------------------------- stop tokens

_STOP_CACHE: weakref.WeakKeyDictionary[Any, dict[str, tuple[int, ...]]] = weakref.WeakKeyDictionary()
_STOP_CACHE_BY_ID: dict[int, tuple[Any, dict[str, tuple[int, ...]]]] = {}


def _cache_for(tokenizer: Any) -> dict[str, tuple[int, ...]]:
    try:
        return _STOP_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: keep it alive alongside its entry
        entry = _STOP_CACHE_BY_ID.setdefault(id(tokenizer), (tokenizer, {}))
        return entry[1]


def _vocabulary_texts(lm: ParticleLM) -> list[str]:
    """The decoded text of every single token id (special tokens decode to "")."""
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer.batch_decode([[i] for i in range(lm.vocab_size)], skip_special_tokens=True)
    return [lm.decode([i]) for i in range(lm.vocab_size)]


def token_set(lm: ParticleLM, key: str, keep: Callable[[str], bool]) -> tuple[int, ...]:
    """Vocabulary ids (EOS excluded) whose decoded text passes ``keep``; computed once per tokenizer and ``key``."""
    tokenizer = getattr(lm, "tokenizer", None)
    owner = lm if tokenizer is None else tokenizer
    cache = _cache_for(owner)
    if key not in cache:
        eos = lm.eos_token_id
        cache[key] = tuple(i for i, text in enumerate(_vocabulary_texts(lm)) if i != eos and keep(text))
    return cache[key]


def ends_sentence(text: str) -> bool:
    """Whether a token's text ends a sentence: after stripping trailing whitespace and closing quotes/brackets it
    ends with ``.``, ``!`` or ``?`` (``"."``, ``" end."``, ``".\\n"``, ``'?"'``, ``"!)"``)."""
    stripped = text.rstrip().rstrip(CLOSING_CHARACTERS).rstrip()
    return bool(stripped) and stripped[-1] in SENTENCE_END_CHARACTERS


def sentence_end_token_ids(lm: ParticleLM) -> tuple[int, ...]:
    """Vocabulary ids whose decoded text ends a sentence (:func:`ends_sentence`); computed once per tokenizer.

    Caveat: a lone ``"."`` token also ends abbreviations and decimals ("Mr.", "3.5"): the sentence-level tasks accept
    that (a particle then stops early), as a sentence splitter without look-ahead must.
    """
    return token_set(lm, "sentence_end", ends_sentence)


def newline_token_ids(lm: ParticleLM) -> tuple[int, ...]:
    """Vocabulary ids whose decoded text contains a line break; computed once per tokenizer."""
    return token_set(lm, "newline", lambda text: "\n" in text)
