"""A cached corpus of base-model samples with their frozen features, for off-policy twist training.

Sampling is what training costs on a CPU; the base model p0 is frozen. So draw once, per prompt x_b, N samples
s^n ~ p0(· | x_b) and keep, for every row n,

    tokens (N, T), lengths (N,), prompt_index (N,), log_phi (N,) = log φ(s^n),
    hidden (N, T, H) = h_t(s^n_<t), the base LM's last hidden state before each token (what twist heads read),

recorded from the sampler's own step (no second forward pass). Every loss whose expectations are over p0 or σ (CTL
with target positives, SIXO, FUDGE; MATH.md "Twist losses") can then reuse the corpus for thousands of updates:

* E_p0[f(s_1:t)]: rows drawn uniformly;
* E_σ[f(s_1:t)], σ ∝ p0 φ: rows drawn with probability φ(s^n) / Σ_m φ(s^m) (sampling-importance-resampling from
  p0; consistent as N → ∞, and for 0 ≤ φ ≤ 1 the rows a rejection sampler would accept are exact σ samples);
* E_π_t[f], π_t ∝ p0(s_1:t) ψ_t(s_1:t): uniform rows weighted by ψ_t, self-normalised (done by the CTL loss).

The corpus is written in chunks of ``chunk_particles`` samples per prompt, each atomically as it is finished and each
drawn with its own seed (``seed``, chunk number), so a killed build resumes where it stopped and yields the same
corpus, and a larger corpus extends a smaller one. Because a chunk's content depends only on its number, several
processes can draw one corpus side by side (``shard=(i, n)``: chunks c ≡ i mod n), e.g. one per core or per
accelerate process, and the union is the corpus one process would have drawn. ``corpus.json`` records what it was drawn from (model, prompts, horizon, potential, settings); loading it
for another target is refused naming the difference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from twistlm.errors import ConfigError, TwistLMError
from twistlm.files import atomic_save_safetensors, atomic_write_text
from twistlm.smc import run_smc
from twistlm.target import Target

CONFIG_NAME = "corpus.json"
CHUNK_NAME = "chunk-{:05d}.safetensors"
CHUNK_SEED_STRIDE = 1_000_003
"""Chunk c of a corpus with seed S is drawn with generator seed S · stride + c (disjoint, reproducible streams)."""
DEFAULT_CHUNK_PARTICLES = 256
FIELDS = ("tokens", "lengths", "prompt_index", "log_phi", "hidden")


def corpus_fingerprint(target: Target) -> dict:
    """What a corpus must share with the target that trains on it."""
    return {
        "model": target.lm.name,
        "vocab_size": int(target.lm.vocab_size),
        "hidden_size": int(target.lm.hidden_size),
        "prompt_ids": [list(map(int, p)) for p in target.prompt_ids],
        "max_new_tokens": int(target.max_new_tokens),
        "potential": getattr(target.potential, "name", type(target.potential).__name__),
        "stop_ids": sorted(int(i) for i in target.stop_ids),
    }


@dataclass
class SampleCorpus:
    """N stored p0 samples with their features (module docstring); row order = chunk order."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_index: torch.Tensor
    log_phi: torch.Tensor
    hidden: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_new_tokens(self) -> int:
        return int(self.tokens.shape[1])

    def rows_of(self, prompt: int) -> torch.Tensor:
        """Indices of the rows that continue prompt ``prompt``."""
        return (self.prompt_index == prompt).nonzero().squeeze(1)

    def draw(self, prompt: int, n: int, generator: torch.Generator, by: str = "p0") -> torch.Tensor:
        """``n`` row indices of prompt ``prompt``, with replacement: uniform (``by="p0"``) or ∝ φ (``by="sigma"``)."""
        rows = self.rows_of(prompt)
        if rows.numel() == 0:
            raise ConfigError(f"the corpus has no sample of prompt {prompt}")
        if by == "p0":
            return rows[torch.randint(rows.numel(), (n,), generator=generator)]
        log_phi = self.log_phi[rows]
        if not bool(torch.isfinite(log_phi).any()):
            raise ConfigError(
                f"no corpus sample of prompt {prompt} has φ > 0 ({rows.numel()} samples): a larger corpus is needed "
                "to draw target positives"
            )
        probs = torch.exp(log_phi - log_phi.max())
        return rows[torch.multinomial(probs, n, replacement=True, generator=generator)]

    def summary(self) -> dict:
        """N, rows with φ > 0, and the importance-sampling estimate log Ẑ = log mean φ per prompt."""
        out = {"rows": self.num_rows, "positive_rows": int(torch.isfinite(self.log_phi).sum())}
        log_z = []
        for b in range(int(self.prompt_index.max()) + 1):
            lp = self.log_phi[self.rows_of(b)]
            log_z.append(float(torch.logsumexp(lp, 0) - torch.log(torch.tensor(float(lp.numel()), dtype=lp.dtype))))
        out["log_z"] = log_z
        return out


class _Recorder:
    """Sampler callback that keeps h_t(s_<t) of every row at every step (rows never move: κ = 0)."""

    def __init__(self, num_rows: int, T: int, hidden_size: int):
        self.hidden = torch.zeros(num_rows, T, hidden_size, dtype=torch.float32)

    def __call__(self, t: int, T: int, info: dict) -> None:
        self.hidden[:, t - 1] = info["hidden"].detach().to(device="cpu", dtype=torch.float32)


def _draw_chunk(target: Target, particles: int, seed: int) -> dict[str, torch.Tensor]:
    T, B = target.max_new_tokens, target.num_prompts
    rec = _Recorder(B * particles, T, target.lm.hidden_size)
    gen = torch.Generator().manual_seed(seed)
    results = run_smc(target, particles, proposal="base", ess_threshold=0.0, generator=gen, callback=rec)
    seqs = [s for r in results for s in r.token_ids]
    tokens = torch.full((len(seqs), T), target.lm.eos_token_id, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    for n, s in enumerate(seqs):
        tokens[n, : len(s)] = torch.tensor(s, dtype=torch.long)
    steps = torch.arange(1, T + 1).unsqueeze(0)
    rec.hidden[steps.expand(len(seqs), T) > lengths.unsqueeze(1)] = 0.0  # after the end: nothing to learn, store 0
    return {
        "tokens": tokens,
        "lengths": lengths,
        "prompt_index": torch.arange(B).repeat_interleave(particles),
        "log_phi": torch.cat([r.log_phi.double() for r in results]),
        "hidden": rec.hidden,
    }


def build_corpus(
    target: Target,
    directory: str | os.PathLike,
    samples_per_prompt: int,
    *,
    seed: int = 0,
    chunk_particles: int = DEFAULT_CHUNK_PARTICLES,
    progress: Callable[[int, int], None] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> SampleCorpus | None:
    """Draw (or finish drawing) at least ``samples_per_prompt`` p0 samples per prompt of ``target`` into
    ``directory``: ⌈samples_per_prompt / chunk_particles⌉ whole chunks, so chunk c is the same whatever size is asked
    for and a larger corpus extends a smaller one.

    Chunks already on disk are kept (resume, or growth); a folder holding a corpus of another target or drawn with
    another seed or chunk size is refused. ``progress(done, total)`` is called after every chunk of this shard.

    ``shard=(i, n)``: draw only chunks c with c mod n = i (module docstring); returns the loaded corpus once every
    chunk is on disk, else None (the other shards are still drawing; load it when they are done).
    """
    if samples_per_prompt < 1 or chunk_particles < 1:
        raise ConfigError(f"a corpus needs ≥ 1 sample per prompt and per chunk, got {samples_per_prompt}, {chunk_particles}")
    index, count = shard
    if not (isinstance(count, int) and isinstance(index, int) and 0 <= index < count):
        raise ConfigError(f"shard must be (i, n) with 0 ≤ i < n, got {shard!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wanted = {**corpus_fingerprint(target), "chunk_particles": int(chunk_particles), "seed": int(seed)}
    config_path = directory / CONFIG_NAME
    if config_path.exists():
        _check_same(_read_config(directory), wanted, directory, keys=tuple(wanted))
    else:
        atomic_write_text(config_path, json.dumps(wanted, indent=1, sort_keys=True))
    chunks = -(-samples_per_prompt // chunk_particles)
    mine = range(index, chunks, count)
    for done, c in enumerate(mine, start=1):
        path = directory / CHUNK_NAME.format(c)
        if not _readable(path):
            atomic_save_safetensors(path, _draw_chunk(target, chunk_particles, seed * CHUNK_SEED_STRIDE + c))
        if progress is not None:
            progress(done * chunk_particles, len(mine) * chunk_particles)
    if count > 1 and not all((directory / CHUNK_NAME.format(c)).is_file() for c in range(chunks)):
        return None
    return load_corpus(directory, target, samples_per_prompt)


def load_corpus(
    directory: str | os.PathLike,
    target: Target | None = None,
    samples_per_prompt: int | None = None,
    *,
    chunks: range | None = None,
) -> SampleCorpus:
    """The corpus in ``directory``: its first ⌈samples_per_prompt / chunk⌉ chunks (default: every chunk present), or
    exactly the chunks numbered in ``chunks`` (e.g. ``range(24, 48)``: a held-out part, independent of chunks 0–23).
    With ``target``, refused unless drawn for the same target."""
    directory = Path(directory)
    info = _read_config(directory)
    if target is not None:
        _check_same(info, corpus_fingerprint(target), directory, keys=tuple(corpus_fingerprint(target)))
    chunk = int(info["chunk_particles"])
    if chunks is not None and samples_per_prompt is not None:
        raise ConfigError("give samples_per_prompt or chunks, not both")
    if chunks is None and samples_per_prompt is None:
        present = 0
        while (directory / CHUNK_NAME.format(present)).is_file():
            present += 1
        if present == 0:
            raise ConfigError(f"corpus {directory} has no chunk yet")
        chunks = range(present)
    elif chunks is None:
        chunks = range(-(-samples_per_prompt // chunk))
    if len(chunks) == 0 or chunks[0] < 0:
        raise ConfigError(f"corpus chunks must be a non-empty range of chunk numbers ≥ 0, got {chunks!r}")
    parts = []
    for c in chunks:
        path = directory / CHUNK_NAME.format(c)
        if not path.is_file():
            raise ConfigError(f"corpus {directory} is incomplete: {path.name} is missing (build it again to finish it)")
        parts.append(_load_chunk(path))
    data = {k: torch.cat([p[k] for p in parts]) for k in FIELDS}
    span = [chunks[0], chunks[-1] + 1]
    return SampleCorpus(**data, info={**info, "samples_per_prompt": len(chunks) * chunk, "chunks": span})


def rescore_corpus(source: str | os.PathLike, target: Target, directory: str | os.PathLike) -> SampleCorpus:
    """The corpus of ``source`` re-scored for ``target``'s potential, written to ``directory``.

    A corpus's rows are p0 samples drawn with κ = 0, so its tokens and features depend on the prompts, the horizon,
    the model and the seed only, never on φ: re-scoring every row with another potential of the same prompts and
    horizon gives exactly the corpus :func:`build_corpus` would draw for it with the same seed (a test checks this),
    without sampling again. Chunks are written atomically and a killed run resumes; ``directory`` must be another
    folder (the source stays valid for its own target).
    """
    source, directory = Path(source), Path(directory)
    info = _read_config(source)
    wanted = {**corpus_fingerprint(target), "chunk_particles": int(info["chunk_particles"]), "seed": int(info["seed"])}
    same_draws = tuple(k for k in wanted if k != "potential")
    _check_same(info, wanted, source, keys=same_draws)
    if source.resolve() == directory.resolve():
        raise ConfigError(f"rescore_corpus writes a new folder; {directory} is the source corpus")
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / CONFIG_NAME
    if config_path.exists():
        _check_same(_read_config(directory), wanted, directory, keys=tuple(wanted))
    else:
        atomic_write_text(config_path, json.dumps(wanted, indent=1, sort_keys=True))
    c = 0
    while (source / CHUNK_NAME.format(c)).is_file():
        path = directory / CHUNK_NAME.format(c)
        if not _readable(path):
            data = _load_chunk(source / CHUNK_NAME.format(c))
            rows = [data["tokens"][n, : int(data["lengths"][n])].tolist() for n in range(data["tokens"].shape[0])]
            data["log_phi"] = target.log_phi(rows, data["prompt_index"].tolist()).double().cpu()
            atomic_save_safetensors(path, data)
        c += 1
    return load_corpus(directory, target)


def _load_chunk(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        data = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise TwistLMError(f"corpus chunk {path} is damaged ({exc}); delete it and build the corpus again") from exc
    missing = [k for k in FIELDS if k not in data]
    if missing:
        raise TwistLMError(f"corpus chunk {path} lacks {', '.join(missing)}")
    return data


def _readable(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        _load_chunk(path)
    except TwistLMError:
        return False
    return True


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{directory} is not a corpus folder ({CONFIG_NAME} missing)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def _check_same(saved: dict, wanted: dict, directory: Path, keys: tuple[str, ...]) -> None:
    for key in keys:
        if saved.get(key) != wanted.get(key):
            raise ConfigError(
                f"corpus {directory} was drawn with another {key} ({_short(saved.get(key))} vs {_short(wanted.get(key))}); "
                "use another folder"
            )


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
