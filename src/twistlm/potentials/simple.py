"""Built-in elementary potentials and the ``name:argument`` registry the CLI uses.

* ``regex:PATTERN`` — φ = 1[re.search(PATTERN, s)] (hard constraint, bounded);
* ``contains:TEXT`` — φ = 1[TEXT in s] (bounded);
* ``length:ALPHA`` — φ = exp(−ALPHA · |s| tokens) (bounded for ALPHA ≥ 0);
* ``none`` — φ ≡ 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from twistlm.errors import ConfigError
from twistlm.potentials.base import Potential, Sequences, ZeroPotential

NEG_INF = float("-inf")


class RegexPotential(Potential):
    """Indicator φ(s) = 1 if ``pattern`` matches somewhere in the completion, else 0 (log φ = −∞)."""

    bounded = True

    def __init__(self, pattern: str, flags: int = 0):
        try:
            self.regex = re.compile(pattern, flags)
        except re.error as exc:
            raise ConfigError(f"bad regular expression {pattern!r}: {exc}") from exc
        self.name = f"regex:{pattern}"

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        hits = [self.regex.search(t) is not None for t in seqs.texts]
        return torch.tensor([0.0 if h else NEG_INF for h in hits], dtype=torch.float64)


class ContainsPotential(RegexPotential):
    """Indicator that the completion contains ``text`` verbatim."""

    def __init__(self, text: str):
        super().__init__(re.escape(text))
        self.name = f"contains:{text}"


class LengthPotential(Potential):
    """φ(s) = exp(−alpha · number of generated tokens): prefers short (alpha > 0) or long (alpha < 0) completions."""

    def __init__(self, alpha: float):
        self.alpha = float(alpha)
        self.bounded = self.alpha >= 0
        self.name = f"length:{alpha}"

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        return torch.tensor([-self.alpha * len(ids) for ids in seqs.token_ids], dtype=torch.float64)


def _float_arg(name: str, arg: str) -> float:
    try:
        return float(arg)
    except ValueError as exc:
        raise ConfigError(f"potential {name!r} needs a number, got {arg!r}") from exc


def _needs_arg(name: str, arg: str | None) -> str:
    if not arg:
        raise ConfigError(f"potential {name!r} needs an argument: {name}:VALUE")
    return arg


POTENTIALS: dict[str, Callable[[str | None], Potential]] = {
    "none": lambda arg: ZeroPotential(),
    "regex": lambda arg: RegexPotential(_needs_arg("regex", arg)),
    "contains": lambda arg: ContainsPotential(_needs_arg("contains", arg)),
    "length": lambda arg: LengthPotential(_float_arg("length", _needs_arg("length", arg))),
}
"""Registry: spec name → builder from the text after the first ``:``."""


def register_potential(name: str, builder: Callable[[str | None], Potential]) -> None:
    """Make ``name[:ARG]`` usable wherever a potential spec is accepted (CLI ``--potential``)."""
    POTENTIALS[name] = builder


def potential_from_spec(spec: str) -> Potential:
    """Build a potential from ``name`` or ``name:argument`` (see the module docstring)."""
    if not spec.strip():
        raise ConfigError(f"the potential is empty; give one of: {', '.join(sorted(POTENTIALS))} (none: φ ≡ 1)")
    name, _, arg = spec.partition(":")
    if name not in POTENTIALS:
        raise ConfigError(f"unknown potential {name!r}; choose from: {', '.join(sorted(POTENTIALS))}")
    return POTENTIALS[name](arg or None)
