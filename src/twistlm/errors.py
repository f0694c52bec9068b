"""Exceptions that name the problem.

Every error a user can cause by bad input derives from :class:`TwistLMError`, so the CLI can print it as one clear
line (exit code 2) instead of a traceback from deep inside torch.
"""


class TwistLMError(ValueError):
    """Base class: a user-facing problem with a message that says what is wrong and, where possible, how to fix it."""


class ModelLoadError(TwistLMError):
    """A model name or path that cannot be loaded (missing directory, unknown hub id while offline, bad GGUF file)."""


class PromptTooLongError(TwistLMError):
    """Prompt tokens plus max new tokens exceed the model's context window."""


class PotentialError(TwistLMError):
    """A potential returned NaN, a wrong shape, or +inf; the message names the potential."""


class ResamplingError(TwistLMError):
    """Resampling is impossible, e.g. every particle of a group has weight zero (log weight −∞)."""


class DataError(TwistLMError):
    """A malformed data file; the message names the file and the line number."""


class ConfigError(TwistLMError):
    """An unknown registry name (resampler, potential, task, loss) or an out-of-range setting."""
