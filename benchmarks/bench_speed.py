"""Speed benchmark (issue 2): twistlm SMC / twisted SMC vs the `generate` floor and vs llamppl.

On the embedded model (SmolLM2-135M), CPU, prompt "Once upon a time", T new tokens, K particles:

* generate   HF ``model.generate`` sampling K sequences of exactly T tokens (min_new_tokens = T, top_k = 0): the floor;
* smc        ``twistlm.smc`` with the base proposal, multinomial resampling at every step (κ = 1). Multinomial draws
             really change the ancestors, so the KV cache is gathered (reordered) at every step; systematic
             resampling with equal weights would be the identity and skip that copy;
* twisted    twisted SMC with a linear twist head over the full vocabulary (random N(0, 0.01²) weights), same resampling;
* llamppl    (optional) llamppl 0.2.x ``smc_standard`` on the same HF model object, prompt, K and T.

Methods are interleaved within each repetition (gen, smc, twisted, llamppl, gen, smc, ...) after one warm-up run of
each; the table shows medians, the ratio of medians and the median of paired ratios (method_i / generate_i in the same
repetition, the more reliable figure on a noisy machine). PASS/FAIL uses the paired ratios.

Usage:
    .venv/bin/python benchmarks/bench_speed.py                      # K = 16, 64, 256; T = 32; 3 repeats
    .venv/bin/python benchmarks/bench_speed.py --memory --scaling --json bench.json
    .venv/bin/python benchmarks/bench_speed.py --ks 16 --tokens 8 --repeats 1 --skip-llamppl   # smoke test

llamppl is the optional extra ``bench`` (pip install -e '.[bench]'); if it cannot be imported or fails, its column
says why and the rest of the benchmark goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback

PROMPT = "Once upon a time"
TARGETS = {"smc": 1.05, "twisted": 1.2, "llamppl_speedup": 6.0, "memory_gb": 3.0}
# llamppl resamples when ESS < ess_threshold·K; a threshold > 1 makes that always true: resampling at every step.
LLAMPPL_EVERY_STEP = 2.0


# ----------------------------------------------------------------------------------------------------------- methods


class Bench:
    """The model loaded once, plus one callable per method: ``run(method, K, T, seed) -> seconds``."""

    def __init__(self, llamppl_ess: float, llamppl_batch: int | None):
        import torch

        import twistlm

        self.torch, self.twistlm = torch, twistlm
        t0 = time.perf_counter()
        self.lm = twistlm.load_lm()
        self.load_s = time.perf_counter() - t0
        self.prompt_ids = torch.tensor([self.lm.encode(PROMPT)])
        self._twist = None  # built on first use, so the memory baseline is the model alone
        self.llamppl_ess = llamppl_ess
        self.llamppl_batch = llamppl_batch
        self._llamppl = None  # (module, CachedCausalLM, Model class), built on first use
        self.llamppl_error: str | None = None

    # -- the floor
    def generate(self, K: int, T: int, seed: int) -> None:
        torch = self.torch
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.lm.model.generate(
                self.prompt_ids.repeat(K, 1),
                attention_mask=torch.ones(K, self.prompt_ids.shape[1], dtype=torch.long),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=T,
                min_new_tokens=T,
                pad_token_id=self.lm.eos_token_id,
            )
        assert out.shape == (K, self.prompt_ids.shape[1] + T), out.shape

    # -- twistlm
    def _target(self, T: int):
        return self.twistlm.Target(self.lm, prompt=PROMPT, potential=None, max_new_tokens=T)

    def smc(self, K: int, T: int, seed: int) -> None:
        res = self.twistlm.smc(self._target(T), K, resampler="multinomial", ess_threshold=1.0, seed=seed)
        assert len(res.resampled_at) > 0 or T == 1

    def twisted(self, K: int, T: int, seed: int) -> None:
        if self._twist is None:
            self._twist = self.twistlm.LinearTwist.for_lm(self.lm, init_scale=0.01, seed=0)
        self.twistlm.smc(
            self._target(T),
            K,
            proposal="twisted",
            twist=self._twist,
            resampler="multinomial",
            ess_threshold=1.0,
            seed=seed,
        )

    # -- llamppl 0.2.x
    def _llamppl_setup(self):
        if self._llamppl is not None:
            return self._llamppl
        import warnings

        import llamppl
        from genlm.backend.llm import AsyncTransformer

        # genlm passes `past_key_values=`, which transformers 5 deprecates in favour of `cache=` (harmless here).
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

        # CachedCausalLM.from_pretrained wants a hub id; its constructor takes a genlm AsyncLM, and AsyncTransformer
        # wraps an already-loaded HF model and tokenizer (the very objects twistlm uses).
        kwargs = {} if self.llamppl_batch is None else {"batch_size": self.llamppl_batch}
        llm = llamppl.CachedCausalLM(AsyncTransformer(self.lm.model, self.lm.tokenizer, **kwargs))

        class SampleT(llamppl.Model):
            """Sample T tokens from the LM (φ ≡ 1): the model the SMC row samples from."""

            def __init__(self, lm, prompt: str, T: int):
                super().__init__()
                self.context = llamppl.LMContext(lm, prompt)
                self.eos = lm.tokenizer.eos_token_id
                self.T = T

            async def step(self):
                token = await self.sample(self.context.next_token())
                if self.context.token_count >= self.T or token.token_id == self.eos:
                    self.finish()

            def immutable_properties(self):
                return {"T", "eos"}

        self._llamppl = (llamppl, llm, SampleT)
        return self._llamppl

    def llamppl(self, K: int, T: int, seed: int) -> None:
        import asyncio

        import numpy as np

        llamppl, llm, SampleT = self._llamppl_setup()
        llm.clear_cache()  # no logprob / KV reuse across runs
        np.random.seed(seed)
        model = SampleT(llm, PROMPT, T)
        particles = asyncio.run(llamppl.smc_standard(model, K, ess_threshold=self.llamppl_ess))
        assert len(particles) == K

    def run(self, method: str, K: int, T: int, seed: int) -> float:
        t0 = time.perf_counter()
        getattr(self, method)(K, T, seed)
        return time.perf_counter() - t0


def llamppl_available() -> str | None:
    """None if llamppl 0.2.x imports, else why not."""
    try:
        import importlib.metadata

        import llamppl  # noqa: F401

        version = importlib.metadata.version("llamppl")
        if not version.startswith("0.2."):
            return f"llamppl {version} installed; the benchmark targets 0.2.x"
        return None
    except Exception as exc:  # noqa: BLE001 -- ImportError, or a broken dependency
        return f"llamppl not usable ({type(exc).__name__}: {exc}); install the extra: pip install -e '.[bench]'"


# --------------------------------------------------------------------------------------------------------- measuring


def measure(bench: Bench, methods: list[str], K: int, T: int, repeats: int, log) -> dict[str, list[float]]:
    """One warm-up run of each method, then ``repeats`` interleaved rounds; seconds per method per round."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rnd in range(-1, repeats):
        for m in list(methods):
            if m not in times:
                continue
            try:
                dt = bench.run(m, K, T, seed=max(rnd, 0) + 1000 * (rnd < 0))
            except Exception as exc:  # only llamppl is allowed to fail
                if m != "llamppl":
                    raise
                bench.llamppl_error = f"llamppl failed: {type(exc).__name__}: {exc}"
                log(bench.llamppl_error)
                log(traceback.format_exc(limit=3))
                del times[m]
                methods.remove(m)
                continue
            tag = "warm-up" if rnd < 0 else f"rep {rnd + 1}/{repeats}"
            log(f"  K={K:<4} T={T:<3} {m:<8} {tag:<9} {dt:7.2f} s")
            if rnd >= 0:
                times[m].append(dt)
    return times


def summarize(times: dict[str, list[float]]) -> dict:
    """Medians, ratio of medians and the median paired ratio of every method over `generate`."""
    out: dict = {"times_s": times, "median_s": {m: statistics.median(v) for m, v in times.items() if v}}
    gen = times.get("generate", [])
    med_gen = out["median_s"].get("generate")
    out["ratio_of_medians"], out["paired_ratios"], out["paired_ratio_median"] = {}, {}, {}
    for m, v in times.items():
        if m == "generate" or not v or not gen:
            continue
        out["ratio_of_medians"][m] = out["median_s"][m] / med_gen
        n = min(len(v), len(gen))
        paired = [v[i] / gen[i] for i in range(n)]
        out["paired_ratios"][m] = paired
        out["paired_ratio_median"][m] = statistics.median(paired)
    if "llamppl" in times and "smc" in times and times["llamppl"] and times["smc"]:
        n = min(len(times["llamppl"]), len(times["smc"]))
        paired = [times["llamppl"][i] / times["smc"][i] for i in range(n)]
        out["llamppl_over_smc_paired"] = paired
        out["llamppl_over_smc_paired_median"] = statistics.median(paired)
        out["llamppl_over_smc_ratio_of_medians"] = out["median_s"]["llamppl"] / out["median_s"]["smc"]
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(rows: dict[int, dict], T: int, llamppl_note: str | None) -> list[str]:
    """The main table; returns the PASS/FAIL lines."""
    print()
    print(
        f"Speed, T = {T} new tokens, prompt {PROMPT!r}. Ratios: median of paired (same-repetition) ratios "
        "[ratio of medians]."
    )
    head = (
        f"{'K':>5} | {'generate s':>10} | {'SMC s':>8} {'SMC/gen':>16} | {'twisted s':>9} {'tw/gen':>16} |"
        f" {'llamppl s':>9} {'llamppl/SMC':>16}"
    )
    print(head)
    print("-" * len(head))
    checks = []

    def col(med: dict, m: str, width: int = 8) -> str:
        return f"{med[m]:{width}.2f}" if m in med else f"{'-':>{width}}"

    def rat(pr: dict, rm: dict, m: str) -> str:
        return f"{pr[m]:.3f}x [{rm[m]:.3f}x]" if m in pr else "-"

    for K, s in rows.items():
        med, pr, rm = s["median_s"], s["paired_ratio_median"], s["ratio_of_medians"]
        lp = (
            f"{s['llamppl_over_smc_paired_median']:.1f}x [{s['llamppl_over_smc_ratio_of_medians']:.1f}x]"
            if "llamppl_over_smc_paired_median" in s
            else "-"
        )
        print(
            f"{K:>5} | {col(med, 'generate', 10)} | {col(med, 'smc')} {rat(pr, rm, 'smc'):>16} | "
            f"{col(med, 'twisted', 9)} {rat(pr, rm, 'twisted'):>16} | {col(med, 'llamppl', 9)} {lp:>16}"
        )
        if "smc" in pr:
            checks.append(
                f"K={K:<4} SMC/generate     {pr['smc']:.3f}x  (target <= {TARGETS['smc']}x)   "
                f"{verdict(pr['smc'] <= TARGETS['smc'])}"
            )
        if "twisted" in pr:
            checks.append(
                f"K={K:<4} twisted/generate {pr['twisted']:.3f}x  (target <= {TARGETS['twisted']}x)    "
                f"{verdict(pr['twisted'] <= TARGETS['twisted'])}"
            )
        if "llamppl_over_smc_paired_median" in s:
            sp = s["llamppl_over_smc_paired_median"]
            checks.append(
                f"K={K:<4} llamppl/SMC      {sp:.1f}x    (target >= {TARGETS['llamppl_speedup']}x)    "
                f"{verdict(sp >= TARGETS['llamppl_speedup'])}"
            )
    if llamppl_note:
        print(f"llamppl: {llamppl_note}")
    print()
    for c in checks:
        print(c)
    return checks


# ------------------------------------------------------------------------------------------------------------ memory


def _status_gb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status (VmRSS: current RSS, VmHWM: peak RSS since start or the last reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def _maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the run's peak excludes the model-loading transient."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(method: str, K: int, T: int) -> None:
    """Run in a fresh process: load the model, record RSS, run one `method` (or nothing), print peaks as JSON.

    peak_gb is getrusage's ru_maxrss (the whole process, model loading included); run_peak_gb is VmHWM reset after
    loading, i.e. the peak RSS while the method ran (model weights included, loading transient excluded; the twisted
    run includes its twist head, 49152 x 576 fp32 = 0.11 GB).
    """
    import gc

    bench = Bench(llamppl_ess=LLAMPPL_EVERY_STEP, llamppl_batch=None)
    bench.generate(1, 1, seed=0)  # touch every weight once (they load lazily), so the baseline is the model in RAM
    gc.collect()
    after_load = {"rss_gb": _status_gb("VmRSS"), "peak_gb": _maxrss_gb()}
    reset = _reset_peak()
    dt = bench.run(method, K, T, seed=0) if method != "baseline" else 0.0
    print(
        json.dumps(
            {
                "method": method,
                "K": K,
                "T": T,
                "after_load": after_load,
                "peak_gb": _maxrss_gb(),
                "run_peak_gb": _status_gb("VmHWM") if reset else None,
                "rss_end_gb": _status_gb("VmRSS"),
                "seconds": dt,
            }
        )
    )


def memory_parent(methods: list[str], K: int, T: int, threads: int | None, log) -> dict:
    out = {}
    for m in ["baseline", *methods]:
        cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", m, "--ks", str(K), "--tokens", str(T)]
        if threads:
            cmd += ["--threads", str(threads)]
        log(f"  memory: {m} K={K} T={T} (fresh process)")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            out[m] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
            continue
        out[m] = json.loads(lines[-1])
    print()
    print(f"Peak memory (max RSS of a fresh process), K = {K}, T = {T}:")
    base = out.get("baseline", {}).get("after_load", {}).get("rss_gb")
    if base is not None:
        print(
            f"  after loading the model: RSS {base:.2f} GB (peak while loading "
            f"{out['baseline']['after_load']['peak_gb']:.2f} GB)"
        )
    checks = []
    for m in methods:
        r = out[m]
        if "error" in r:
            print(f"  {m:<9} failed: {r['error']}")
            continue
        peak = r["run_peak_gb"] if r.get("run_peak_gb") is not None else r["peak_gb"]
        inc = peak - r["after_load"]["rss_gb"]
        line = (
            f"  {m:<9} peak {peak:.2f} GB during the run (+{inc:.2f} GB over the loaded model; "
            f"ru_maxrss {r['peak_gb']:.2f} GB incl. loading; {r['seconds']:.1f} s)"
        )
        if m in ("smc", "twisted"):
            ok = peak <= TARGETS["memory_gb"]
            line += f"  target <= {TARGETS['memory_gb']} GB  {verdict(ok)}"
            checks.append(f"memory {m} K={K} T={T} {peak:.2f} GB {verdict(ok)}")
        print(line)
    out["checks"] = checks
    return out


# ----------------------------------------------------------------------------------------------------------- scaling


def linear_fit(x: list[float], y: list[float]) -> dict:
    """Least-squares y = a + b x with R²."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx if sxx > 0 else 0.0
    a = my - b * mx
    ss_res = sum((yi - a - b * xi) ** 2 for xi, yi in zip(x, y))
    ss_tot = sum((yi - my) ** 2 for yi in y)
    return {"intercept_s": a, "slope_s": b, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def report_scaling(name: str, xs: list[int], per_method: dict[str, list[float]], other: str, other_val: int) -> dict:
    """Time vs one variable: a line fit, time per token per particle, and the growth factor per doubling."""
    out = {}
    print(f"\nScaling with {name} ({other} = {other_val}); µs per token per particle = t / (K·T):")
    for m, ts in per_method.items():
        if len(ts) != len(xs) or len(xs) < 2:
            continue
        fit = linear_fit([float(x) for x in xs], ts)
        per = [t / (x * other_val) * 1e6 for x, t in zip(xs, ts)]
        growth = [ts[i + 1] / ts[i] / (xs[i + 1] / xs[i]) for i in range(len(xs) - 1)]
        out[m] = {"x": xs, "median_s": ts, "fit": fit, "us_per_token_particle": per, "growth_per_x": growth}
        cells = "  ".join(f"{name}={x}: {t:.2f}s ({p:.0f}µs)" for x, t, p in zip(xs, ts, per))
        print(f"  {m:<9} {cells}")
        print(
            f"  {'':<9} fit t = {fit['intercept_s']:.2f} s + {fit['slope_s'] * 1e3:.2f} ms·{name}, "
            f"R² = {fit['r2']:.4f}; t ratio / {name} ratio between neighbours: "
            + ", ".join(f"{g:.2f}" for g in growth)
            + "  (1.00 = linear, > 1 superlinear)"
        )
    return out


# -------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ks", default="16,64,256", help="particle counts K, comma-separated (default 16,64,256)")
    p.add_argument("--tokens", type=int, default=32, help="T, new tokens (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    p.add_argument("--skip-llamppl", action="store_true", help="leave out llamppl")
    p.add_argument(
        "--llamppl-ess",
        type=float,
        default=LLAMPPL_EVERY_STEP,
        help="llamppl smc_standard ess_threshold (default 2.0 = resample every step like the SMC row; "
        "0.5 is llamppl's default, which never resamples here since φ ≡ 1 keeps weights equal)",
    )
    p.add_argument(
        "--llamppl-batch-size",
        type=int,
        default=None,
        help="genlm AsyncTransformer auto-batch size (default: its own default, 20)",
    )
    p.add_argument("--memory", action="store_true", help="peak memory at K=256, T=64, one fresh process per method")
    p.add_argument("--memory-k", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--memory-tokens", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument(
        "--scaling",
        action="store_true",
        help="time vs K (from the main table) and vs T in {16,32,64} at K=64, with line fits",
    )
    p.add_argument("--scaling-k", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--scaling-ts", default="16,32,64", help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="PATH", help="write every number here")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    T = args.tokens

    if args.memory_child:
        memory_child(args.memory_child, ks[0], T)
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "loadavg": os.getloadavg(),
    }
    methods = ["generate", "smc", "twisted"]
    llamppl_note = None
    if args.skip_llamppl:
        llamppl_note = "skipped (--skip-llamppl)"
    else:
        why = llamppl_available()
        if why:
            llamppl_note = why
            log(why)
        else:
            import importlib.metadata

            methods.append("llamppl")
            env["llamppl"] = importlib.metadata.version("llamppl")
            ess = args.llamppl_ess
            llamppl_note = (
                f"{env['llamppl']}, smc_standard(ess_threshold={ess}"
                f"{' = resample every step' if ess > 1 else ''}), genlm AsyncTransformer batch_size="
                f"{args.llamppl_batch_size or 'default (20)'}; column = llamppl s / SMC s"
            )
    print(
        f"torch {env['torch']} ({env['threads']} threads of {env['cpus']} CPUs), transformers "
        f"{env['transformers']}, python {env['python']}, load average {env['loadavg'][0]:.2f}"
    )
    print(
        "SMC rows: multinomial resampling at every step (κ = 1), so ancestors change and the KV cache is "
        "reordered at every step; twisted: linear twist head over the full vocabulary."
    )

    bench = Bench(args.llamppl_ess, args.llamppl_batch_size)
    print(f"model: {bench.lm.name}, loaded in {bench.load_s:.1f} s")
    results: dict = {"env": env, "T": T, "ks": ks, "repeats": args.repeats, "targets": TARGETS, "speed": {}}

    for K in ks:
        log(f"K = {K}, T = {T}")
        results["speed"][K] = summarize(measure(bench, methods, K, T, args.repeats, log))
    if bench.llamppl_error:
        llamppl_note = bench.llamppl_error
    results["llamppl_note"] = llamppl_note
    results["checks"] = print_table(results["speed"], T, llamppl_note)

    if args.scaling:
        sc: dict = {}
        if len(ks) >= 2:
            per = {
                m: [results["speed"][K]["median_s"][m] for K in ks]
                for m in ("generate", "smc", "twisted")
                if all(m in results["speed"][K]["median_s"] for K in ks)
            }
            sc["K"] = report_scaling("K", ks, per, "T", T)
        Ks, Ts = args.scaling_k, [int(t) for t in args.scaling_ts.split(",")]
        log(f"scaling in T at K = {Ks}")
        by_t = {t: summarize(measure(bench, ["generate", "smc", "twisted"], Ks, t, args.repeats, log)) for t in Ts}
        per_t = {m: [by_t[t]["median_s"][m] for t in Ts] for m in ("generate", "smc", "twisted")}
        sc["T"] = report_scaling("T", Ts, per_t, "K", Ks)
        sc["T_runs"] = by_t
        results["scaling"] = sc

    if args.memory:
        log("peak memory")
        results["memory"] = memory_parent(
            ["generate", "smc", "twisted"], args.memory_k, args.memory_tokens, args.threads, log
        )

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
