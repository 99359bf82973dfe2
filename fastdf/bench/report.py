"""``python -m fastdf.bench.report [RESULTS_DIR] [-o BENCHMARKS.md]``: rebuild BENCHMARKS.md
from ``benches/results/*.json``, showing the latest timing run per card and, beside them,
the latest compile report per target (``compile-*.json`` from ``python -m fastdf.bench.compile``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .core import markdown

HEADER = """# fastdf benchmarks

Latest results per card, written by `python -m fastdf.bench.report` from
`benches/results/*.json` (produced by `benches/gpu_check.sh` on a lent GPU; see
benches/README.md). "vs fastdf" is the baseline's median time over fastdf's in the same
run: above 1, fastdf is faster. CPU runs show algorithmic wins only, never kernel speed.
"""


def latest_per_device(paths):
    """``{device: (data, path)}`` of the newest timing run per card and ``{target: (data,
    path)}`` of the newest compile report per target."""
    runs, compiles = {}, {}
    for path in sorted(paths):
        data = json.loads(Path(path).read_text())
        env = data["environment"]
        into, key = (compiles, env["target"]) if "kernels" in data else (runs, env["device"])
        if key not in into or env["date"] > into[key][0]["environment"]["date"]:
            into[key] = (data, path)
    return runs, compiles


def _cell(value, spec=""):
    return "-" if value is None else format(value, spec)


def compile_markdown(data: dict) -> str:
    """The default config of every launch (and every csrc kernel) as a Markdown table, then
    per Triton kernel how many of its compiled configs spill."""
    from .compile import _config_text

    env = data["environment"]
    out = [f"**{env['target']}** ({env['limits']['card']} limits: {env['limits']['sms']} SMs, "
           f"{env['limits']['smem'] // 1024} KB shared memory and {env['limits']['regs']} registers per SM) · "
           f"Triton {env['triton']} · nvcc {env.get('nvcc')} · commit {env.get('commit')} · {env['date']} · "
           f"{data.get('mode', 'full')} report. {env.get('note', '')}.", "",
           "| job | kernel | config | regs | spill st/ld B | stack | smem KB | wgmma | wait | loads | CTA/SM | "
           "waves | SASS/iter |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["kernels"]:
        if "error" in r:
            out.append(f"| {r['job']} | {r['kernel']} | compile failed: {r['error'].splitlines()[0][:100]} "
                       "| | | | | | | | | | |")
            continue
        if not r.get("default"):
            continue
        smem = r.get("smem", r.get("static_smem"))
        wgmma = (f"{r['wgmma']} {','.join(r['wgmma_shapes'])}" if r.get("wgmma") else
                 "mma.sync" if r.get("mma_sync") else ("HMMA" if r.get("sass_mma") else "-"))
        out.append(f"| {r['job']} | `{r['kernel']}` | {_config_text(r) if r['source'] == 'triton' else '-'} | "
                   f"{r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} | "
                   f"{_cell(None if smem is None else smem / 1024, '.1f')} | {wgmma} | "
                   f"{','.join(map(str, r.get('wgmma_wait_depths') or [])) or '-'} | {r.get('load_kind', '-')} | "
                   f"{_cell(r.get('ctas_per_sm'))} | {_cell(r.get('waves'), '.2f')} | "
                   f"{_cell(r.get('loop_instructions'))} |")
    kernels = {}
    for r in data["kernels"]:
        if r["source"] == "triton" and "error" not in r:
            seen = kernels.setdefault(r["kernel"], {}).setdefault(_config_text(r).rstrip("*"), [0, 0, 0])
            seen[0] += 1
            seen[1] += bool(r["spill_stores"] or r["spill_loads"])
            seen[2] = max(seen[2], r["spill_stores"])
    out += ["", "Every compiled config per Triton kernel (autotune candidates included; * above marks the "
                "default): in bold where it spills, with the launches that spill and the largest spill.", ""]
    for name, configs in sorted(kernels.items()):
        listed = ", ".join(f"**{c}** (spills in {k}/{n}, up to {worst} B)" if k else c
                           for c, (n, k, worst) in sorted(configs.items()))
        out.append(f"- `{name}`: {listed}")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdf.bench.report", description=__doc__)
    parser.add_argument("results", nargs="?", default="benches/results")
    parser.add_argument("-o", "--output", default="BENCHMARKS.md")
    args = parser.parse_args(argv)
    runs, compiles = latest_per_device(Path(args.results).glob("*.json"))
    parts = [HEADER]
    if not any(not device.startswith("CPU") for device in runs):
        parts.append("No GPU results yet: the next session with a lent GPU runs `benches/gpu_check.sh` first.\n")
    for device, (data, path) in sorted(runs.items()):
        parts.append(f"## {device}\n\nFrom `{Path(path).as_posix()}`.\n\n{markdown(data['results'], data['environment'])}\n")
    for target, (data, path) in sorted(compiles.items()):
        parts.append(f"## Compile report: {target}\n\nFrom `{Path(path).as_posix()}` (`python -m fastdf.bench.compile "
                     f"--json {Path(path).as_posix()}`): what the compiler made of each kernel at the GPU benchmark "
                     f"shapes, without a GPU. CTAs/SM and waves are computed from the limits, not measured.\n\n"
                     f"{compile_markdown(data)}\n")
    Path(args.output).write_text("\n".join(parts))
    print(f"wrote {args.output} ({len(runs)} card(s), {len(compiles)} compile report(s))")


if __name__ == "__main__":
    main()
