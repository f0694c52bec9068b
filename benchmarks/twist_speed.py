"""Twisted SMC with a trained twist vs base SMC, per sample (issue 9's performance target: ≤ 1.10× at K = 64).

On the embedded model, for a task's target and each twist (``--twist NAME=DIR``): SMC with resampling at every step
(κ = 1, systematic), K particles, the base proposal and the twist-induced one interleaved within each repetition
(base, twist A, twist B, base, ...) after one warm-up run of each, every run with its own seed. Reported: median
seconds per sample and the median of the paired ratios twisted_i / base_i (the robust figure on a shared machine).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/twist_speed.py --task sentiment -o rating=1 \\
        --twist CTL=runs/sen-ctl --repeats 7 --json twist_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

TARGET_RATIO = 1.10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("-o", "--task-option", action="append", default=[], help="task option key=value")
    ap.add_argument("--twist", action="append", default=[], help="NAME=DIR of a trained twist (repeatable)")
    ap.add_argument("-K", "--particles", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from twistlm.cli.common import load_model, parse_options
    from twistlm.smc import run_smc
    from twistlm.tasks import get_task
    from twistlm.twists.io import load_twist

    torch.set_num_threads(1)
    lm = load_model(None)
    target = get_task(args.task).build(lm, **parse_options(args.task_option))
    twists = {name: load_twist(d, lm) for name, d in (t.split("=", 1) for t in args.twist)}
    K = args.particles

    def run(twist, seed: int) -> float:
        kw = {"proposal": "twisted", "twist": twist} if twist is not None else {}
        t0 = time.perf_counter()
        run_smc(target, K, ess_threshold=1.0, seed=seed, **kw)
        return (time.perf_counter() - t0) / K

    methods = {"base": None, **twists}
    for name, tw in methods.items():  # warm-up
        run(tw, 0)
    times = {name: [] for name in methods}
    for r in range(args.repeats):
        for name, tw in methods.items():
            times[name].append(run(tw, 1 + r))
    out = {"task": args.task, "K": K, "repeats": args.repeats, "T": target.max_new_tokens, "rows": {}}
    print(f"{'proposal':>12} | {'s/sample (median)':>17} | {'paired ratio vs base (median, min–max)':>40}")
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["base"])]
        row = {"s_per_sample": statistics.median(ts), "ratio_median": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios), "times": ts}
        out["rows"][name] = row
        verdict = "" if name == "base" else ("PASS" if row["ratio_median"] <= TARGET_RATIO else "FAIL")
        print(f"{name:>12} | {row['s_per_sample']:17.4f} | {row['ratio_median']:8.3f} ({row['ratio_min']:.3f}–"
              f"{row['ratio_max']:.3f}) {verdict}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
