"""Tools whose output is spliced into a completion while it is sampled (e.g. a calculator after "3 + 4 =").

With a tool the target is p0 *with tool outputs forced*: when a particle emits a trigger token, the tool reads the
completion so far and may return text; its tokens are then appended one per step without sampling. A forced token is
deterministic under both the target and the proposal, so it contributes p0 = q = 1 and the incremental weight of that
step is only the twist ratio ψ_t(s_1:t) / ψ_t−1(s_1:t−1) (or φ / ψ_t−1 if it finishes the particle). Forced tokens
count towards max_new_tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from twistlm.lm import ParticleLM


class Tool(ABC):
    """A deterministic text → text tool consulted after trigger tokens."""

    name: str = "tool"

    @abstractmethod
    def is_trigger(self, token_text: str) -> bool:
        """Whether a token whose decoded text is ``token_text`` should make the sampler consult the tool."""

    @abstractmethod
    def __call__(self, completion: str) -> str | None:
        """Text to append to ``completion`` (the generated text so far), or None to leave it as it is."""

    def trigger_ids(self, lm: ParticleLM) -> list[int]:
        """Token ids that trigger the tool (computed once per LM; cached)."""
        cache = self.__dict__.setdefault("_trigger_cache", {})
        key = id(lm)
        if key not in cache:
            cache[key] = [v for v in range(lm.vocab_size) if self.is_trigger(lm.decode([v]))]
        return cache[key]


class CalculatorTool(Tool):
    """After a token ending in ``=``, evaluate the arithmetic expression before it with the safe evaluator of
    :mod:`twistlm.tasks.calculator` and splice in `` <value>``; anything that is not plain arithmetic is left alone."""

    name = "calculator"

    def is_trigger(self, token_text: str) -> bool:
        return token_text.rstrip().endswith("=")

    def __call__(self, completion: str) -> str | None:
        from twistlm.tasks.calculator import apply_calculator

        spliced, changed = apply_calculator(completion)
        if not changed:
            return None
        value = spliced[len(completion.rstrip()) :]  # " <value>"
        # Tokens already emitted cannot be taken back: after "= " append the value without another space.
        return value.lstrip() if completion != completion.rstrip() else value


class ToolQueue:
    """Per-particle queues of tool tokens waiting to be forced, for one sampler run of N particles."""

    def __init__(self, tool: Tool, lm: ParticleLM, num_rows: int):
        import torch

        self.tool, self.lm = tool, lm
        self.trigger = torch.zeros(lm.vocab_size, dtype=torch.bool)
        self.trigger[tool.trigger_ids(lm)] = True
        self.pending: list[list[int]] = [[] for _ in range(num_rows)]

    def force(self, tokens, active):
        """Overwrite ``tokens`` (N,) in place with the next queued token where one waits; returns the forced mask."""
        import torch

        forced = torch.zeros_like(active)
        for row, queue in enumerate(self.pending):
            if queue and bool(active[row]):
                tokens[row] = queue.pop(0)
                forced[row] = True
        return forced

    def consult(self, target, generated, t: int, sampled, eligible) -> None:
        """Ask the tool about each eligible particle whose token at step t is a trigger; queue what it returns."""
        rows = (eligible & self.trigger[sampled]).nonzero().squeeze(1).tolist()
        for row in rows:
            text = self.lm.decode(target.completion_ids(generated[row, :t].tolist()))
            out = self.tool(text)
            if out:
                self.pending[row] = self.lm.tokenize(out)

    def reorder(self, index) -> None:
        self.pending = [list(self.pending[i]) for i in index.tolist()]
