"""Twist quality (issue 4): the twist-induced proposal q vs the base model p0, embedded SmolLM2-135M, CPU.

For the base proposal and each trained twist (``NAME=DIR``), with K particles and seeds S0, S0+1, …:

* SIS (κ = 0, every particle an independent draw from q): the fraction of the K·seeds unweighted samples that meet
  the task's goal (``Task.success``), and log Ẑ_SIS per seed with mean ± 95% Student-t half-width;
* wall time per sample of SIS and of SMC with resampling at every step (κ = 1, seeds S0+1000, …), whose log Ẑ is
  reported too.

Same as ``twistlm sample --task T [-o k=v] [--proposal twisted --twist DIR] -K 64 --ess-threshold 0 --seed S`` per
seed, without reloading the model each time.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/twist_quality.py --task sentiment -o rating=1 --seeds 3 \\
        --twist CTL=/tmp/tw/sen_ctl --twist RL=/tmp/tw/sen_rl --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

T_CRIT_95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
"""Two-sided 95% Student-t quantiles by sample size (n − 1 degrees of freedom); 1.96 beyond."""
SMC_SEED_OFFSET = 1000


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width; (−inf, nan) if any value is −inf (some run had no particle with φ > 0)."""
    if any(not math.isfinite(v) for v in values):
        return -math.inf, math.nan
    if len(values) < 2:
        return values[0], math.nan
    return statistics.fmean(values), T_CRIT_95.get(len(values), 1.96) * statistics.stdev(values) / len(values) ** 0.5


def evaluate(task, target, twist, K: int, seeds: int, first_seed: int) -> dict:
    from twistlm.smc import run_smc

    proposal = "twisted" if twist is not None else "base"
    row: dict = {"log_z_sis": [], "log_z_smc": [], "goal": 0, "n": 0, "t_sis": 0.0, "t_smc": 0.0}
    for s in range(seeds):
        t0 = time.perf_counter()
        r = run_smc(target, K, proposal=proposal, twist=twist, ess_threshold=0.0, seed=first_seed + s)[0]
        row["t_sis"] += time.perf_counter() - t0
        row["log_z_sis"].append(r.log_z)
        ok = task.success(target, r.texts, [0] * len(r.texts))
        row["goal"] += int(sum(ok))
        row["n"] += len(ok)
        t0 = time.perf_counter()
        r = run_smc(target, K, proposal=proposal, twist=twist, ess_threshold=1.0, seed=first_seed + SMC_SEED_OFFSET + s)
        row["t_smc"] += time.perf_counter() - t0
        row["log_z_smc"].append(r[0].log_z)
    row["goal_fraction"] = row["goal"] / row["n"]
    row["log_z_sis_mean"], row["log_z_sis_ci95"] = mean_ci(row["log_z_sis"])
    row["s_per_sample_sis"] = row["t_sis"] / (seeds * K)
    row["s_per_sample_smc"] = row["t_smc"] / (seeds * K)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("-o", "--task-option", action="append", default=[], help="task option key=value")
    ap.add_argument("--twist", action="append", default=[], help="NAME=DIR of a trained twist (repeatable)")
    ap.add_argument("-K", "--particles", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from twistlm.cli.common import load_model, load_twist, parse_options
    from twistlm.tasks import get_task

    torch.set_num_threads(1)
    lm = load_model(None)
    task = get_task(args.task)
    target = task.build(lm, **parse_options(args.task_option))
    rows = {}
    for name, directory in [("base", None)] + [t.split("=", 1) for t in args.twist]:
        twist = load_twist(directory, lm) if directory else None
        rows[name] = evaluate(task, target, twist, args.particles, args.seeds, args.first_seed)
        r = rows[name]
        print(
            f"{name:8s} goal {r['goal']}/{r['n']}  log Ẑ_SIS {r['log_z_sis_mean']:.3f} ± {r['log_z_sis_ci95']:.3f} "
            f"{[round(x, 3) for x in r['log_z_sis']]}  SMC log Ẑ {[round(x, 3) for x in r['log_z_smc']]}  "
            f"s/sample SMC {r['s_per_sample_smc']:.4f} (SIS {r['s_per_sample_sis']:.4f})",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"task": args.task, "K": args.particles, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
