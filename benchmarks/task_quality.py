"""Task quality (issue 3): base sampling vs SMC on every built-in task, embedded SmolLM2-135M, CPU.

For each task configuration, B independent groups of K particles (B prompts side by side: B data examples, or the
task's one prompt B times) are sampled twice with the base proposal p0:

* **base** — SIS (κ = 0): the K particles are plain p0 samples. Reported: the fraction meeting the task's goal,
  unweighted (what sampling the model gives), and log Ẑ_SIS.
* **SMC** — systematic resampling at every step (κ = 1). Reported: the weighted fraction Σ_k ŵ_k 1[goal(s_k)]
  (the self-normalised estimate of σ(goal)), the fraction among K particles drawn by one final systematic resampling
  of the final weights (what a user taking "K samples from SMC" gets), and log Ẑ_SMC.

Fractions pool the B groups (the weighted one averages the groups where it is defined; a group whose particles all
have weight 0 has Ẑ = 0 and no weighted fraction — the "Ẑ=0" column counts them). log Ẑ is shown per group.
Tasks without a binary goal (tempered, infilling) show log Ẑ only.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/task_quality.py                 # all tasks, K = 64
    .venv/bin/python benchmarks/task_quality.py --tasks toxicity,sentiment --groups 1 --json out.json

Runtime ≈ 6-8 minutes of one CPU core with the defaults (one BLAS thread: on a shared 2-core machine two threads
are several times slower than one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


@dataclass
class Config:
    """One row of the table: a task, its options (data paths relative to the data root), horizon T, groups B."""

    label: str
    task: str
    options: dict = field(default_factory=dict)
    max_new_tokens: int | None = None
    groups: int | None = None  # None: --groups


CONFIGS = [
    Config("toxicity (threshold η=0.5)", "toxicity", {}, 20, groups=8),  # Z ≈ 0.005: pool 8 × 64 samples
    Config("toxicity (tempered β=1)", "toxicity", {"form": "tempered"}, 20),
    Config("sentiment (1 star)", "sentiment", {"rating": 1}, 10),
    Config("arithmetic (test_3op 0-1, 3-shot)", "arithmetic", {"data": "arithmetic/test_3op.json"}, 40),
    Config("gsm8k (train 0, T=64)", "gsm8k", {"data": "gsm8k/train.jsonl"}, 64, groups=1),
    Config("subjectivity (train.50 0-1)", "subjectivity", {"data": "subj/train.50.jsonl"}, 24),
    Config("tempered (τ=0.5, openwebtext 0-1)", "tempered", {"data": "prompts/openwebtext.txt"}, 20),
    Config("infilling (bdmc, T=10, c=8)", "infilling", {}, 10),
    Config("infilling (stories 0-1)", "infilling", {"data": "stories/storycloze_val.csv"}, 24),
]


def _resolve(options: dict, data_root: Path) -> dict:
    out = dict(options)
    if "data" in out:
        out["data"] = str(data_root / out["data"])
    return out


def run_config(lm, cfg: Config, K: int, groups: int, seed: int, data_root: Path) -> dict:
    import torch

    from twistlm import run_smc
    from twistlm.resampling import get_resampler
    from twistlm.tasks import get_task

    task = get_task(cfg.task)
    B = cfg.groups or groups
    t0 = time.perf_counter()
    target = task.build(lm, max_new_tokens=cfg.max_new_tokens, num_prompts=B, **_resolve(cfg.options, data_root))
    base = run_smc(target, K, ess_threshold=0.0, seed=seed)
    smc = run_smc(target, K, ess_threshold=1.0, resampler="systematic", seed=seed)
    row = {
        "label": cfg.label,
        "task": cfg.task,
        "options": cfg.options,
        "T": target.max_new_tokens,
        "B": B,
        "K": K,
        "log_z_base": [r.log_z for r in base],
        "log_z_smc": [r.log_z for r in smc],
        "goal": task.success is not None,
    }
    if task.success is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        resample = get_resampler("systematic")
        base_hits, weighted, resampled_hits, dead = [], [], [], 0
        for b, (rb, rs) in enumerate(zip(base, smc)):
            base_hits += task.success(target, rb.texts, [b] * K)
            ok = torch.tensor(task.success(target, rs.texts, [b] * K), dtype=torch.float64)
            if torch.isneginf(rs.log_weights).all():
                dead += 1
                continue
            weighted.append(float((rs.normalized_weights * ok).sum()))
            idx = resample(rs.log_weights[None], K, gen)[0]
            resampled_hits += ok[idx].tolist()
        row.update(
            base_fraction=sum(base_hits) / len(base_hits),
            smc_weighted=sum(weighted) / len(weighted) if weighted else None,
            smc_resampled=sum(resampled_hits) / len(resampled_hits) if resampled_hits else None,
            smc_dead_groups=dead,
        )
    row["seconds"] = time.perf_counter() - t0
    return row


def _fmt_frac(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def _fmt_logz(values) -> str:
    return " / ".join("−inf" if math.isinf(v) else f"{v:.2f}" for v in values)


def markdown(rows: list[dict]) -> str:
    head = (
        "| task | T | B×K | base: goal frac (unweighted) | SMC: Σŵ·1[goal] | SMC: resampled frac | SMC groups Ẑ=0 "
        "| log Ẑ base (SIS) | log Ẑ SMC | s |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if r["goal"]:
            goal = [_fmt_frac(r["base_fraction"]), _fmt_frac(r["smc_weighted"]), _fmt_frac(r["smc_resampled"])]
            dead = f"{r['smc_dead_groups']}/{r['B']}"
        else:
            goal, dead = ["n/a", "n/a", "n/a"], "n/a"
        cells = [r["label"], str(r["T"]), f"{r['B']}×{r['K']}", *goal, dead]
        cells += [_fmt_logz(r["log_z_base"]), _fmt_logz(r["log_z_smc"]), f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", "-K", type=int, default=64)
    parser.add_argument("--groups", "-B", type=int, default=2, help="independent groups (prompts) per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: all configurations)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    import twistlm

    torch.set_num_threads(args.threads)
    wanted = None if args.tasks is None else set(args.tasks.split(","))
    configs = [c for c in CONFIGS if wanted is None or c.task in wanted]
    start = time.perf_counter()
    lm = twistlm.load_lm()
    rows = []
    for cfg in configs:
        row = run_config(lm, cfg, args.particles, args.groups, args.seed, args.data_root)
        rows.append(row)
        print(f"{cfg.label}: {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - start
    print(
        f"Task quality, {datetime.date.today()}, {lm.name}, CPU ({platform.processor() or platform.machine()}, "
        f"{args.threads} thread), K={args.particles}, seed {args.seed}, total {total:.0f} s\n"
    )
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"data_root": str(args.data_root)}, "rows": rows}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
