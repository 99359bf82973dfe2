"""Benchmark machinery: suites of cases, each timing fastdf against baselines in one run.

A suite is a function ``(device, quick) -> list[Case]`` registered with :func:`suite`.
A :class:`Case` names a shape and builds, on demand, its providers: zero-argument callables,
the first one fastdf's, the rest baselines. Every baseline's ratio is its time over the
first provider's, measured in the same run (DESIGN.md §6). Suites live in
``fastdf/bench/suites/<name>.py`` and register on import.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib
import json
import os
import pkgutil
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

SUITES: dict[str, "Suite"] = {}


class Skip(Exception):
    """Raised by a provider (or a case's setup) that cannot run here; the reason is recorded."""


@dataclasses.dataclass
class Case:
    """One shape. ``setup(device)`` returns ``{provider: fn}`` (ours first). ``flops`` and
    ``bytes`` (the floor: each input read once, each output written once) turn times into
    TFLOP/s and GB/s; ``bytes_by``/``flops_by`` override them per provider."""

    name: str
    setup: Callable[[torch.device], dict[str, Callable[[], object]]]
    flops: float | None = None
    bytes: float | None = None
    flops_by: dict[str, float] = dataclasses.field(default_factory=dict)
    bytes_by: dict[str, float] = dataclasses.field(default_factory=dict)
    # ``timer(fn, quick) -> ms`` replacing the default (e.g. one warm-up and one timed run
    # for end-to-end cases that take seconds per call).
    timer: Callable[[Callable[[], object], bool], float] | None = None


@dataclasses.dataclass
class Suite:
    name: str
    cases: Callable[[torch.device, bool], list[Case]]
    help: str


def suite(name: str, help: str = ""):
    """Register ``fn(device, quick) -> list[Case]`` as suite ``name``."""

    def decorate(fn):
        SUITES[name] = Suite(name, fn, help or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return decorate


def load_suites() -> dict[str, Suite]:
    from . import suites

    for info in pkgutil.iter_modules(suites.__path__):
        importlib.import_module(f"{suites.__name__}.{info.name}")
    return SUITES


# ---------------------------------------------------------------------------- timing


def time_gpu(fn, quick: bool) -> float:
    """Median milliseconds with CUDA events; do_bench clears L2 between repetitions."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")


def time_cpu(fn, quick: bool) -> float:
    """Median wall-clock milliseconds of one callable (CPU numbers show algorithmic wins
    only); :func:`time_cpu_interleaved` with a single provider."""
    return time_cpu_interleaved({"fn": fn}, quick)["fn"]


def time_cpu_interleaved(fns: dict[str, Callable[[], object]], quick: bool) -> dict[str, float | Exception]:
    """Median wall-clock milliseconds of each callable, timed in round-robin rounds.

    Timing providers one after another biased every CPU ratio: the first one timed paid
    for the allocator's first large blocks (glibc's adaptive mmap threshold moves while a
    process allocates) and for whatever the machine's load did during its turn. Here all
    providers share one warm-up and every round calls each once, in a fresh seeded random
    order (none runs twice in a row); each gets the median of its own samples. The garbage collector is paused while sampling. A provider
    that raises is dropped from later rounds and its exception returned in place of a time.
    """
    out: dict[str, float | Exception] = {}
    live = dict(fns)

    def call(name):
        t0 = time.perf_counter()
        try:
            live[name]()
        except Exception as err:  # reported per provider; the others keep running
            out[name] = err
            del live[name]
            return None
        return time.perf_counter() - t0

    # Warm-up: whole rounds until each provider's last two calls agree within 10% (at most
    # 5 rounds or 0.5 s after the first).
    last: dict[str, float] = {}
    start = time.perf_counter()
    for _ in range(5):
        settled = True
        for name in list(live):
            now = call(name)
            if now is None:
                continue
            settled &= name in last and abs(now - last[name]) <= 0.1 * last[name]
            last[name] = now
        if settled or time.perf_counter() - start > 0.5:
            break
    # Sampling: at least 3 rounds, then rounds until the budget (per provider, as when they
    # were timed one by one) or 50 rounds, but never less than `floor` seconds: 50 rounds of a
    # ~100 us case are ~15 ms, whose medians moved +-3% from one run to the next (one
    # process, the same inputs); ~0.25 s of rounds moved +-0.5%.
    samples: dict[str, list[float]] = {name: [] for name in live}
    budget = (0.5 if quick else 2.0) * max(len(live), 1)
    floor = 0.1 if quick else 0.25
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        rounds, start, rng, previous = 0, time.perf_counter(), random.Random(0), None
        while live and (rounds < 3 or (time.perf_counter() - start < budget
                                       and (rounds < 50 or time.perf_counter() - start < floor))):
            # A fresh (seeded) order each round, never starting with the provider that
            # ended the last one: what runs just before a call matters (after its own call
            # a provider finds a warm cache, ~8 us of a 30 us merge; after a 500 ms baseline
            # a cold one), so every provider gets every predecessor alike. Two providers
            # simply alternate.
            order = list(live)
            rng.shuffle(order)
            if previous is not None and len(order) > 1 and order[0] == previous:
                order[0], order[1] = order[1], order[0]
            for name in order:
                now = call(name)
                if now is not None:
                    samples[name].append(now * 1e3)
                previous = name
            rounds += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    for name in fns:
        if name not in out:
            out[name] = statistics.median(samples[name])
    return {name: out[name] for name in fns}


def time_once(fn, quick: bool) -> float:
    """Wall-clock milliseconds of one run after one warm-up run (GPU work synchronised):
    for end-to-end cases that take seconds per call."""
    def run():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    run()
    return run() if quick else min(run(), run())


def peak_memory_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ---------------------------------------------------------------------------- environment


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_ceilings(device) -> dict:
    """The card's copy bandwidth and bf16 matmul rate, measured once (DESIGN.md §6)."""
    if device.type != "cuda":
        return {}
    n = 1 << 28  # 512 MiB of bf16 each way: far larger than L2
    src = torch.randn(n // 2, device=device, dtype=torch.float32).view(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_gpu(lambda: dst.copy_(src), quick=True)
    copy_gbps = 2 * src.numel() * src.element_size() / ms / 1e6
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = time_gpu(lambda: a @ b, quick=True)
    return {"copy_GBps": round(copy_gbps, 1), "bf16_matmul_TFLOPs": round(2 * 8192**3 / ms / 1e9, 1)}


def environment(device) -> dict:
    from fastdf import __version__, _native

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fastdf": __version__,
        "commit": _git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {_cpu_name()}",
        "fastdf._C": _native.unavailable_reason() or "available",
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return info


# ---------------------------------------------------------------------------- running


def run_case(suite_name: str, case: Case, device, quick: bool, memory: bool = True) -> list[dict]:
    rows = []
    timer = case.timer or (time_gpu if device.type == "cuda" else time_cpu)
    try:
        providers = case.setup(device)
    except Skip as why:
        return [dict(suite=suite_name, case=case.name, provider="*", error=f"skipped: {why}")]
    # On the CPU the default timer runs every provider in the same rounds (a fair share of
    # the allocator's and the machine's state); a case's own timer or a GPU times each alone.
    together = time_cpu_interleaved(providers, quick) if case.timer is None and device.type != "cuda" else {}
    for provider, fn in providers.items():
        row = dict(suite=suite_name, case=case.name, provider=provider)
        try:
            ms = together[provider] if together else timer(fn, quick)
            if isinstance(ms, Exception):
                raise ms
            row["ms"] = ms
            if memory:
                row["peak_MB"] = peak_memory_mb(fn, device)
        except Skip as why:
            row["error"] = f"skipped: {why}"
        except Exception as err:  # a broken baseline must not hide the other numbers
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        flops = case.flops_by.get(provider, case.flops)
        nbytes = case.bytes_by.get(provider, case.bytes)
        if "ms" in row:
            if flops:
                row["TFLOPs"] = flops / row["ms"] / 1e9
            if nbytes:
                row["GBps"] = nbytes / row["ms"] / 1e6
        rows.append(row)
    ours = rows[0].get("ms") if rows else None
    for row in rows[1:]:
        if ours and row.get("ms"):
            row["fastdf_speedup"] = row["ms"] / ours
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def combine_runs(runs: list[list[dict]]) -> list[dict]:
    """One case measured ``len(runs)`` times (each a ``run_case`` result) as one set of rows:
    per provider the median time (``ms``) and every run's time (``ms_runs``); per baseline
    the median of the runs' ratios (``fastdf_speedup``: each ratio compares times taken in
    the same interleaved rounds) and their range (``fastdf_speedup_range``). A provider
    that failed in any run keeps that run's error."""
    if len(runs) == 1:
        return runs[0]
    out = []
    for i, first in enumerate(runs[0]):
        same = [run[i] for run in runs if i < len(run) and run[i]["provider"] == first["provider"]]
        failed = [r for r in same if "error" in r or "ms" not in r]
        if failed or len(same) != len(runs):
            out.append(failed[0] if failed else first)
            continue
        row = dict(first)
        times = [r["ms"] for r in same]
        row["ms"] = statistics.median(times)
        row["ms_runs"] = times
        for key in ("TFLOPs", "GBps"):
            if key in first:
                row[key] = first[key] * first["ms"] / row["ms"]
        ratios = [r["fastdf_speedup"] for r in same if r.get("fastdf_speedup")]
        if len(ratios) == len(same):
            row["fastdf_speedup"] = statistics.median(ratios)
            row["fastdf_speedup_range"] = [min(ratios), max(ratios)]
        out.append(row)
    return out


def run(names, device, quick: bool, progress: bool = True, rows: list | None = None, on_case=None,
        echo: Callable[[str], None] | None = None, repeat: int = 1) -> list[dict]:
    """Run the named suites case by case, appending result rows to ``rows`` (returned);
    ``on_case(rows)`` after each case lets a caller save partial results as it goes, and
    ``echo(line)`` receives each case's one-line summary as soon as it is measured (through
    the progress bar's writer when the bar is shown, so the two do not garble each other).
    ``repeat`` > 1 measures each case that many times (fresh inputs each time) and reports
    the medians with the ratios' range (:func:`combine_runs`)."""
    from tqdm.auto import tqdm

    suites = load_suites()
    unknown = [n for n in names if n not in suites]
    if unknown:
        raise SystemExit(f"unknown suite(s) {', '.join(unknown)}; available: {', '.join(sorted(suites))}")
    work = [(name, case) for name in names for case in suites[name].cases(device, quick)]
    rows = [] if rows is None else rows
    bar = tqdm(work, desc="fastdf.bench", unit="case", disable=not progress)
    for i, (name, case) in enumerate(bar, 1):
        t0 = time.perf_counter()
        done = combine_runs([run_case(name, case, device, quick) for _ in range(repeat)])
        rows.extend(done)
        if echo is not None:
            line = f"[{i}/{len(work)}] {case_line(done)}  ({time.perf_counter() - t0:.1f} s)"
            (tqdm.write if progress else echo)(line)
        if on_case is not None:
            on_case(rows)
    return rows


def case_line(rows: list[dict]) -> str:
    """One case's result on one line: the first provider's time, then each baseline's time
    and its ratio to the first ('x' above 1: fastdf faster)."""
    if not rows:
        return "(no providers)"
    parts = []
    for r in rows:
        if "error" in r:
            parts.append(f"{r['provider']} {r['error'][:80]}")
        else:
            parts.append(f"{r['provider']} {r['ms']:.4g} ms" + (f" ({_ratio(r)})" if r.get("fastdf_speedup") else ""))
    return f"{rows[0]['suite']} | {rows[0]['case']}: " + " | ".join(parts)


# ---------------------------------------------------------------------------- reporting


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _ratio(row) -> str:
    """'1.23x', or '1.23x (1.10-1.31)' with the range of repeated runs."""
    text = f"{row['fastdf_speedup']:.2f}x"
    span = row.get("fastdf_speedup_range")
    return text + (f" ({span[0]:.2f}-{span[1]:.2f})" if span else "")


def table(rows: list[dict]) -> str:
    """Fixed-width table; 'vs fastdf' is the baseline's time over fastdf's (>1: fastdf faster)."""
    header = ("suite", "case", "provider", "median ms", "TFLOP/s", "GB/s", "peak MB", "vs fastdf")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append((r["suite"], r["case"], r["provider"], r["error"], "", "", "", ""))
            continue
        lines.append((
            r["suite"], r["case"], r["provider"], _fmt(r.get("ms"), ".4g"), _fmt(r.get("TFLOPs"), ".1f"),
            _fmt(r.get("GBps"), ".0f"), _fmt(r.get("peak_MB"), ".0f"),
            _ratio(r) if r.get("fastdf_speedup") else "-",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    widths[3] = min(widths[3], 60)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    previous = (None, None)
    for line in lines:
        shown = list(line)
        if (line[0], line[1]) == previous:
            shown[0] = shown[1] = ""
        previous = (line[0], line[1])
        out.append("  ".join(str(x).ljust(w) for x, w in zip(shown, widths)).rstrip())
    return "\n".join(out)


def markdown(rows: list[dict], env: dict) -> str:
    """The same results as a Markdown table (for BENCHMARKS.md)."""
    out = [f"**{env['device']}** · torch {env['torch']} · Triton {env.get('triton')} · CUDA {env.get('cuda')} · "
           f"commit {env.get('commit')} · {env['date']}", ""]
    if env.get("ceilings"):
        out += [f"Measured ceilings: {env['ceilings']}", ""]
    out += ["| suite | case | provider | median ms | TFLOP/s | GB/s | peak MB | vs fastdf |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['suite']} | {r['case']} | {r['provider']} | {r['error']} | | | | |")
            continue
        speed = _ratio(r) if r.get("fastdf_speedup") else "-"
        out.append(
            f"| {r['suite']} | {r['case']} | {r['provider']} | {_fmt(r.get('ms'), '.4g')} | {_fmt(r.get('TFLOPs'), '.1f')} | "
            f"{_fmt(r.get('GBps'), '.0f')} | {_fmt(r.get('peak_MB'), '.0f')} | {speed} |"
        )
    return "\n".join(out)


def write_text(path, text: str):
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then a
    rename), creating missing folders: an interrupted write never leaves a truncated file
    in place of the previous results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, rows, env):
    """Environment and results as JSON (atomic; rewritten after every case by the CLI)."""
    write_text(path, json.dumps({"environment": env, "results": rows}, indent=1, default=str) + "\n")


def plot(path, rows, env):
    """One horizontal bar per (case, baseline): how many times faster fastdf ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{r['suite']}: {r['case']} vs {r['provider']}", r["fastdf_speedup"]) for r in rows if r.get("fastdf_speedup")]
    fig, ax = plt.subplots(figsize=(10, max(2.0, 0.32 * len(bars) + 1)))
    if bars:
        labels, values = zip(*bars)
        ax.barh(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no baseline ratios in this run", ha="center", va="center")
    ax.set_xlabel("fastdf speedup (baseline time / fastdf time)")
    ax.set_title(f"fastdf {env['fastdf']} on {env['device']} ({env.get('commit')})", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
