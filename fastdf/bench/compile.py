"""``python -m fastdf.bench.compile``: what the compiler makes of every GPU kernel, without a GPU.

Every Triton kernel is compiled through its real launcher (``fastdf.kernels.*``) called on
meta tensors at the benchmark shapes: the launch is intercepted before anything runs, the
launcher's arguments are specialised the way the runtime would, and every config the launch
would try (each autotune candidate, or the one fixed config) is compiled for a chosen target
(sm_90a by default; sm_80 and sm_100a on request) with Triton's own ptxas. Every csrc kernel
is compiled with ``nvcc -Xptxas -v``. Reported per kernel and config: registers, spill
stores/loads, stack frame, shared memory, wgmma shapes and count, ``wgmma.wait_group``
depths, load kind (TMA / cp.async / plain ld.global), pipeline stages, CTAs per SM from the
H100 (or chosen target's) limits, waves at the shape, and SASS instructions per iteration of
the main loop (the innermost loop with the most MMA instructions, from ``cuobjdump -sass``).

The process must not run under ``TRITON_INTERPRET=1`` (the kernels decide at import time
whether they are interpreted), so tests run this in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Per-SM limits (CUDA occupancy calculator values) and SM counts of the reference cards.
LIMITS = {
    80: dict(card="A100", sms=108, regs=65536, smem=164 * 1024, smem_block=163 * 1024, threads=2048, ctas=32),
    90: dict(card="H100 SXM", sms=132, regs=65536, smem=228 * 1024, smem_block=227 * 1024, threads=2048, ctas=32),
    100: dict(card="B200", sms=148, regs=65536, smem=228 * 1024, smem_block=227 * 1024, threads=2048, ctas=32),
}
RESERVED_SMEM = 1024  # per CTA, taken by the runtime on sm_80+


def occupancy(arch: int, regs: int, smem: int, warps: int) -> dict:
    """CTAs per SM from registers (allocated per warp in units of 256), shared memory (plus the
    1 KB the runtime reserves per CTA), threads and the CTA cap; 0 when one CTA does not fit."""
    lim = LIMITS[arch]
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by = {
        "regs": lim["regs"] // (per_warp * warps),
        "smem": 0 if smem > lim["smem_block"] else lim["smem"] // (smem + RESERVED_SMEM),
        "threads": lim["threads"] // (32 * warps),
        "ctas": lim["ctas"],
    }
    ctas = min(by.values())
    return {"ctas_per_sm": ctas, "limited_by": min(by, key=by.get)}


def waves(arch: int, grid_ctas: int | None, ctas_per_sm: int) -> float | None:
    if not grid_ctas or not ctas_per_sm:
        return None
    return grid_ctas / (ctas_per_sm * LIMITS[arch]["sms"])


# ---------------------------------------------------------------------------- ptxas / SASS parsing

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict]:
    """``{mangled entry: {regs, stack, spill_stores, spill_loads, static_smem}}`` from ``ptxas -v``."""
    out, current = {}, None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), dict(regs=0, stack=0, spill_stores=0, spill_loads=0, static_smem=0))
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), dict(regs=0, stack=0, spill_stores=0, spill_loads=0, static_smem=0))
            continue
        if current is None:
            continue
        m = _PTXAS_FRAME.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _PTXAS_USED.search(line)
        if m:
            current["regs"] = int(m.group(1))
            s = _PTXAS_SMEM.search(line)
            if s:
                current["static_smem"] = int(s.group(1))
    return out


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_MMA_OPS = ("HGMMA", "HMMA", "UTCHMMA", "UTCQMMA", "IMMA")


def _sass_with_predicates(sass: str) -> dict[str, list[tuple[int, str, str, bool]]]:
    """``{function: [(address, opcode, operands, predicated)]}`` from ``cuobjdump -sass``
    (``predicated``: guarded by a predicate other than @PT)."""
    funcs, current = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        m = _SASS_LINE.search(line)
        if m and current is not None:
            pred = (m.group(2) or "").strip()
            current.append((int(m.group(1), 16), m.group(3), m.group(4), bool(pred) and pred != "@PT"))
    return funcs


def sass_functions(sass: str) -> dict[str, list[tuple[int, str, str]]]:
    """``{function: [(address, opcode, operands)]}`` from ``cuobjdump -sass``."""
    return {name: [i[:3] for i in instrs] for name, instrs in _sass_with_predicates(sass).items()}


def sass_summary(instrs: list[tuple[int, str, str]]) -> dict:
    """Instruction counts and the main loop: among innermost loops (a backward branch whose
    body holds no other backward branch), the one with the most MMA instructions, then one
    fed by TMA, then the shortest: the steady-state loop (the edge-tile copies of the same
    loop carry masking and pointer loads, and run once or twice per program); its size is
    the SASS instruction count of one iteration."""
    if not instrs:
        return {}
    index = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    loops = []
    for i, (addr, op, args) in enumerate(instrs):
        if op.split(".")[0] not in ("BRA", "JMP"):
            continue
        m = re.search(r"(0x[0-9a-f]+)", args)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < addr and target in index:
            loops.append((index[target], i))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]

    def count(ops, prefixes):
        return sum(1 for _, op, _ in ops if op.split(".")[0] in prefixes)

    best = None
    for a, b in innermost:
        body = instrs[a:b + 1]
        score = (count(body, _MMA_OPS), count(body, ("UTMALDG",)) > 0, -len(body))
        if best is None or score > best[0]:
            best = (score, body)
    ops = [op.split(".")[0] for _, op, _ in instrs]
    out = {
        "sass_instructions": len(instrs),
        "sass_mma": sum(op in _MMA_OPS for op in ops),
        "sass_ldg": ops.count("LDG"),
        "sass_ldgsts": ops.count("LDGSTS"),
        "sass_tma_loads": ops.count("UTMALDG"),
        "sass_local_ld_st": ops.count("LDL") + ops.count("STL"),
        "loops": len(loops),
    }
    if best is not None:
        body = best[1]
        body_ops = [op.split(".")[0] for _, op, _ in body]
        out.update(loop_instructions=len(body), loop_mma=sum(op in _MMA_OPS for op in body_ops),
                   loop_local_ld_st=body_ops.count("LDL") + body_ops.count("STL"))
    return out


def ptx_summary(ptx: str) -> dict:
    shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    waits = sorted(set(int(x) for x in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)))
    tma = len(re.findall(r"cp\.async\.bulk\.tensor\.\d+d\.shared::cluster\.global", ptx))
    cp_async = len(re.findall(r"cp\.async\.c[ag]\.shared\.global", ptx))
    ld_global = len(re.findall(r"\bld\.global\b", ptx))
    kinds = [k for k, n in (("TMA", tma), ("cp.async", cp_async), ("ld.global", ld_global)) if n]
    return {"wgmma": len(re.findall(r"wgmma\.mma_async", ptx)), "wgmma_shapes": shapes, "wgmma_wait_depths": waits,
            "mma_sync": len(re.findall(r"\bmma\.sync\.aligned", ptx)),
            "tcgen05_mma": len(re.findall(r"\btcgen05\.mma\.", ptx)), "tma_loads": tma, "cp_async": cp_async,
            "ld_global": ld_global, "load_kind": "+".join(kinds) or "none"}


def _tool(name: str) -> str | None:
    """A CUDA binary tool: Triton's bundled copy first, then PATH."""
    try:
        import triton.backends.nvidia as nv

        path = Path(nv.__file__).parent / "bin" / name
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    return shutil.which(name)


def disassemble(cubin: bytes) -> str:
    tool = _tool("cuobjdump")
    if tool is None:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        run = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, timeout=300)
    return run.stdout if run.returncode == 0 else ""


# ---------------------------------------------------------------------------- Triton capture


@dataclasses.dataclass
class Launch:
    """One compiled (kernel, config) of a launch."""

    job: str
    kernel: str
    config: dict
    default: bool
    grid: tuple | None
    compiled: object = None
    error: str | None = None
    log: str = ""


class _Capture:
    """Replaces ``JITFunction.run`` and ``Autotuner.run`` so that a launcher's launch compiles
    for ``target`` (each autotune config, or the default only) instead of running."""

    def __init__(self, arch: int, only_default: bool):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.only_default = only_default
        self.job = None
        self.step = None  # which launch of a job (e.g. "fwd down"), set through step()
        self.launches: list[Launch] = []
        self._config = None  # (config dict, default?) while an autotuner compiles a candidate
        self._memo = {}

    def jit_run(self, fn, args, kwargs):
        import triton
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        grid = kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        backend = make_backend(self.target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, _ = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, None)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) if grid is not None else None
        meta = {k: v for k, v in bound.items() if fn.params[list(bound).index(k)].is_constexpr}
        meta.update(num_warps=options.num_warps, num_stages=options.num_stages)
        config, default = self._config if self._config is not None else (meta, True)
        job = f"{self.job}: {self.step}" if self.step else self.job
        launch = Launch(job, fn.__name__, {**meta, **config}, default, grid)
        key = (fn, str(signature), str(sorted(constexprs.items())), str(sorted(attrs.items())), str(options))
        if key in self._memo:
            launch.compiled, launch.log, launch.error = self._memo[key]
        else:
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    launch.compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=self.target,
                                                     options=options.__dict__)
            except Exception as err:  # one config failing to compile is a result, not a crash
                launch.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err) else ''}"
            launch.log = out.getvalue()
            self._memo[key] = (launch.compiled, launch.log, launch.error)
        self.launches.append(launch)

    def tune_run(self, tuner, args, kwargs):
        configs = tuner.configs[:1] if self.only_default else tuner.configs
        for i, cfg in enumerate(configs):
            meta = dict(cfg.all_kwargs())
            self._config = ({**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, i == 0)
            try:
                tuner.fn.run(*args, **{**kwargs, **meta})
            finally:
                self._config = None

    @contextlib.contextmanager
    def patched(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        from fastdf.kernels import _device, cascade

        global _ACTIVE
        saved = JITFunction.run, Autotuner.run, _device.num_sms, _device.tma_capable, cascade._sm_resources
        capture = _ACTIVE = self
        lim = LIMITS[capture.target.arch]
        JITFunction.run = lambda fn, *args, **kwargs: capture.jit_run(fn, args, kwargs)
        Autotuner.run = lambda tuner, *args, **kwargs: capture.tune_run(tuner, args, kwargs)
        # Launchers that size grids from the device see the target's SMs (meta tensors have none).
        _device.num_sms = lambda device: lim["sms"]
        cascade._sm_resources = lambda device: (lim["sms"], lim["smem"])
        # Meta tensors say nothing about the card: the launch takes TMA only where sm_90+ would.
        _device.tma_capable = lambda device: capture.target.arch >= 90
        try:
            yield
        finally:
            JITFunction.run, Autotuner.run, _device.num_sms, _device.tma_capable, cascade._sm_resources = saved
            _ACTIVE = None


_ACTIVE: _Capture | None = None


def step(name: str | None):
    """Name the launches that follow within the current job (several launches of one kernel)."""
    if _ACTIVE is not None:
        _ACTIVE.step = name


def compile_signature(jit, signature: dict, constexprs: dict, div16=(), num_warps: int = 4, num_stages: int = 3,
                      arch: int = 90):
    """Compile ``jit`` for ``sm_{arch}`` from an explicit specialisation (parameter name ->
    Triton type for ``signature``, name -> value for ``constexprs``, names of 16-divisible
    arguments in ``div16``); parameters not named are ``i32``. For probing a kernel outside
    its launcher (a config or layout the launchers do not pick yet)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = jit.arg_names
    sig = {n: ("constexpr" if n in constexprs else signature.get(n, "i32")) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    return triton.compile(ASTSource(fn=jit, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _source_hash() -> str:
    import hashlib

    import triton

    h = hashlib.sha256(f"{triton.__version__} {shutil.which('nvcc')}".encode())
    files = [*ROOT.joinpath("fastdf").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py"),
             *ROOT.joinpath("csrc").iterdir()]
    for f in sorted(p for p in files if p.is_file()):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def ci_report(timeout: float = 900) -> dict:
    """The ``--ci`` report (one shape per kernel group, every config, every csrc kernel),
    compiled in a subprocess without ``TRITON_INTERPRET`` and kept in the temp folder under a
    hash of every fastdf, kernels and csrc source: the test files that gate on it share one
    compile, and any source change compiles afresh."""
    path = Path(tempfile.gettempdir()) / f"fastdf-compile-ci-{_source_hash()}.json"
    if path.is_file():
        return json.loads(path.read_text())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    run = subprocess.run([sys.executable, "-m", "fastdf.bench.compile", "--ci", "--no-sass", "--json", str(tmp)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if not tmp.is_file():
        raise RuntimeError(f"the compile report failed (exit {run.returncode}):\n{run.stdout[-3000:]}\n"
                           f"{run.stderr[-3000:]}")
    os.replace(tmp, path)  # kept even when some kernel failed: the gates name it
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------- jobs: launchers at the benchmark shapes


def _meta(*shape, dtype=None):
    import torch

    return torch.empty(*shape, dtype=dtype or torch.bfloat16, device="meta")


def _attention_jobs(ci: bool):
    from fastdf.bench.suites import attention as suite
    from fastdf.kernels import attention as K
    from fastdf.ops.attention import _mask_args

    import torch

    shapes = dict(suite.GPU_SHAPES)
    if ci:  # one shape per kernel: (b) reaches fwd/dkdv/dq/preprocess, (c) the window, (e) the short kernels
        shapes = {n: s for n, s in shapes.items() if n[0] in "bce" and not n.startswith("c KV chunk Tk=9") and
                  not n.startswith("c KV chunk Tk=18")}
    # Decode-sized chunks (16 queries against 32k keys) take the small-Tq forward path.
    shapes["decode Tq=16 Tk=32760"] = (1, 12, 12, 16, 32760, 128, {})
    jobs = []
    for name, (B, Hq, Hkv, Tq, Tk, D, mask) in shapes.items():
        def job(B=B, Hq=Hq, Hkv=Hkv, Tq=Tq, Tk=Tk, D=D, mask=mask, backward=not name.startswith("decode")):
            q = _meta(B, Tq, Hq, D).transpose(1, 2)
            k, v = (_meta(B, Tk, Hkv, D).transpose(1, 2) for _ in range(2))
            causal = bool(mask)
            m = _mask_args(q, k, mask.get("frame_size", 1), causal, mask.get("window_frames"),
                           mask.get("sink_frames", 0))
            out = torch.empty_like(q)
            lse = _meta(B, Hq, Tq, dtype=torch.float32)
            K.attention_forward(q, k, v, out, lse, m, D ** -0.5)
            if not backward:
                return
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            K.attention_backward(torch.empty_like(out), None, q, k, v, out, lse, dq, dk, dv, m, D ** -0.5)
        jobs.append((f"attention {name}", job))
    return jobs


def _adaln_jobs(ci: bool):
    from fastdf.bench.suites import adaln as suite
    from fastdf.kernels import adaln as K

    import torch

    shapes = dict(suite.GPU_SHAPES)
    if ci:  # one shape per launch config (the configs depend on C's power of two only)
        by_block = {}
        for name, shape in shapes.items():
            by_block.setdefault(K._row_config(shape[3]), (name, shape))
        shapes = dict(by_block.values())
    jobs = []
    for name, (B, T, F, C) in shapes.items():
        def job(B=B, T=T, F=F, C=C):
            x, y = _meta(B, T, C), _meta(B, T, C)
            shift, scale, gate = (_meta(B, F, C) for _ in range(3))
            mean, rstd = (_meta(B, T, dtype=torch.float32) for _ in range(2))
            K.modulate_forward(x, shift, scale, None, None, y, mean, rstd, False, 1e-6)
            K.modulate_backward(torch.empty_like(y), x, scale, None, None, mean, rstd, torch.empty_like(x), False)
            K.gated_forward(x, y, gate, torch.empty_like(x))
            K.gated_backward(torch.empty_like(x), y, gate, torch.empty_like(y))
        jobs.append((f"adaln {name}", job))
    return jobs


def _moe_jobs(ci: bool):
    from fastdf.bench.suites import moe as suite
    from fastdf.kernels import grouped_mm as G
    from fastdf.kernels import moe as M

    import torch

    shapes = dict(suite.SHAPES)
    if ci:
        shapes = dict(list(shapes.items())[:1])
    jobs = []
    for name, (E, top, H, I) in shapes.items():
        def job(E=E, top=top, H=H, I=I, T=16384 if name != "mixtral-8x7b" else 4096):
            S = T * top
            i32 = torch.int32
            x = _meta(T, H)
            offs, rows = _meta(E + 1, dtype=i32), _meta(S, dtype=i32)
            w_gu = _meta(E, 2 * I, H).transpose(1, 2)  # HF gate_up_proj [E, 2I, H] read as [E, H, 2I]
            w_dn = _meta(E, H, I).transpose(1, 2)
            h, a, y = _meta(S, 2 * I), _meta(S, I), _meta(S, H)
            # forward: GLU gate/up on gathered rows (storing h for backward), then down
            step("fwd gate_up+GLU")
            G.gmm(x, w_gu, offs, a, rows=rows, glu_act=0, h=h)
            step("fwd down")
            G.gmm(a, w_dn, offs, y)
            # backward: dA = dY @ W_down^T, GLU backward, dX = dH @ W_gate_up^T, dW of both
            step("bwd dA")
            G.gmm(y, _meta(E, H, I), offs, a)
            step("bwd GLU")
            M.glu_backward(h, a, _meta(S, dtype=torch.float32), 0, torch.empty_like(h), _meta(S, dtype=torch.float32))
            step("bwd dX")
            G.gmm(h, _meta(E, 2 * I, H), offs, _meta(S, H))
            ids = _meta(E, dtype=torch.int64)
            step("bwd dW gate_up")
            G.gmm_dw(x, h, offs, ids, _meta(E, H, 2 * I), x_rows=rows)
            step("bwd dW down")
            G.gmm_dw(a, y, offs, ids, _meta(E, I, H))
            step("combine")
            M.combine(y, rows, _meta(T, top, dtype=torch.float32), _meta(T, H))
            step("gather")
            M.gather(x, rows, _meta(S, H))
        jobs.append((f"moe {name}", job))
    return jobs


def _cascade_jobs(ci: bool):
    from fastdf.bench.suites import cascade as suite
    from fastdf.kernels import cascade as K

    import torch

    jobs = []
    for g, n, h, d in [(8, 128, 32, 128)] if ci else [(8, 128, 32, 128), (4, 64, 32, 256), (64, 64, 8, 128)]:
        def job(g=g, n=n, h=h, d=d):
            from fastdf.ops.cascade import _launch_layout

            o_a, o_b = (_meta(g, n, h, d) for _ in range(2))
            lse_a, lse_b = (_meta(g, n, h, dtype=torch.float32) for _ in range(2))
            (o_a, lse_a, o_b, lse_b), (o, lse), (sizes, strides) = _launch_layout(o_a, lse_a, o_b, lse_b)
            K.merge_states(o_a, lse_a, o_b, lse_b, o, lse, sizes, strides)
        jobs.append((f"cascade merge G{g} N{n} H{h} D{d}", job))
    del suite
    hq, hkv, d = 32, 8, 128
    shapes = [(128, 2048, 64)] if ci else [(n, p, 64) for n in (16, 64, 128, 256) for p in (512, 2048, 8192)]
    for n, p, s in shapes:
        def job(n=n, p=p, s=s):
            q = _meta(1, n, hq, d)
            kp, vp = _meta(1, hkv, p, d), _meta(1, hkv, p, d)
            ks, vs = _meta(1, n, hkv, s, d), _meta(1, n, hkv, s, d)
            # The launcher sizes the key splits itself (from the target's SMs: see patched()).
            K.shared_prefix(q, kp, vp, ks, vs, _meta(1, dtype=torch.int32), _meta(1, n, dtype=torch.int32), d ** -0.5,
                            _meta(1, n, hq, d), _meta(1, n, hq, dtype=torch.float32))
        jobs.append((f"shared-prefix N{n} P{p} S{s} Hq{hq} Hkv{hkv} D{d}", job))
    return jobs


JOB_GROUPS = {"attention": _attention_jobs, "adaln": _adaln_jobs, "moe": _moe_jobs, "cascade": _cascade_jobs}


def _analyse(launch: Launch, arch: int, sass: bool) -> dict:
    # The config keeps tile sizes, warps and stages (the tuning knobs), not the launch's flags.
    # SPLIT (two-pass dK/dV) and SPLIT_K (key-split forward) change the code, so they are
    # shown when set.
    knobs = ("BLOCK", "B", "STAGES", "ROWS", "R", "GROUP")
    row = dict(source="triton", job=launch.job, kernel=launch.kernel, default=launch.default,
               config={k: v for k, v in launch.config.items()
                       if not k.isupper() or k.startswith(knobs) or (k.startswith("SPLIT") and v)},
               grid=list(launch.grid) if launch.grid else None)
    if launch.error:
        row["error"] = launch.error
        return row
    kernel = launch.compiled
    md = kernel.metadata
    ptxas = next(iter(parse_ptxas(launch.log).values()), {})
    warps = md.num_warps
    row.update(warps=warps, stages=launch.config.get("num_stages", md.num_stages), smem=md.shared, **ptxas)
    row.update(ptx_summary(kernel.asm["ptx"]))
    if sass and "cubin" in kernel.asm:
        funcs = sass_functions(disassemble(kernel.asm["cubin"]))
        row.update(sass_summary(next(iter(funcs.values()), [])))
    if "regs" in row:
        row.update(occupancy(arch, row["regs"], row["smem"], warps))
        ctas = math.prod(launch.grid) if launch.grid else None
        row["grid_ctas"] = ctas
        w = waves(arch, ctas, row["ctas_per_sm"])
        row["waves"] = None if w is None else round(w, 3)
    return row


def triton_report(arch: int, ci: bool = False, groups=None, sass: bool = True, echo=None) -> list[dict]:
    """Compile every kernel launch of the chosen job groups for ``sm_{arch}``; one row per
    (job, kernel, config). ``ci``: one shape per group (still every autotune candidate: each
    is a shipped config, and the spill gate covers them all)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton  # noqa: F401

    import fastdf  # noqa: F401  (installs fastdf.kernels)
    from fastdf import kernels

    if kernels.INTERPRET:
        raise RuntimeError("fastdf.kernels was imported under TRITON_INTERPRET=1; run in a fresh process")
    capture = _Capture(arch, only_default=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastdf-compile-") as cache, capture.patched():
        # A fresh cache: ptxas (and its -v log) runs for every compile.
        from triton import knobs

        old_cache, old_dump = knobs.cache.dir, knobs.nvidia.dump_ptxas_log
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = cache, True
        try:
            for group in groups or JOB_GROUPS:
                for name, job in JOB_GROUPS[group](ci):
                    capture.job, capture.step = name, None
                    start = len(capture.launches)
                    t0 = time.perf_counter()
                    try:
                        job()
                    except Exception as err:
                        capture.launches.append(Launch(name, "(launcher)", {}, True, None,
                                                       error=f"{type(err).__name__}: {err}"[:300]))
                    for launch in capture.launches[start:]:
                        row = _analyse(launch, arch, sass)
                        row["arch"] = f"sm_{arch}" + ("a" if arch >= 90 else "")
                        rows.append(row)
                        if echo:
                            echo(row)
                    if echo:
                        echo(f"  ({name}: {time.perf_counter() - t0:.1f} s)")
        finally:
            knobs.cache.dir, knobs.nvidia.dump_ptxas_log = old_cache, old_dump
    return rows


# ---------------------------------------------------------------------------- csrc


def _demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    run = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60)
    out = run.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short_name(symbol: str) -> str:
    """``merge_states_kernel<bf16>`` from
    ``void fastdf::(anonymous namespace)::merge_states_kernel<__nv_bfloat16>(...)``."""
    name = re.sub(r"^void ", "", symbol)
    name = re.sub(r"fastdf::|\(anonymous namespace\)::", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list (the first '(' outside template brackets)
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "f16").replace("unsigned int", "u32")


def csrc_report(arch: int = 90, sass: bool = True, echo=None) -> list[dict]:
    """Every ``csrc/*.cu`` compiled for ``sm_{arch}`` with the build's flags and ``-Xptxas -v``."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (needed for the csrc kernels)")
    sm = f"sm_{arch}" + ("a" if arch >= 90 else "")
    rows = []
    for cu in sorted((ROOT / "csrc").glob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / (cu.stem + ".cubin")
            # -lineinfo maps SASS to source lines (the sampler's first pass); it does not change the code.
            cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}", f"-arch={sm}",
                   "-cubin", "-lineinfo", "-Xptxas", "-v", str(cu), "-o", str(cubin)]
            t0 = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if run.returncode:
                rows.append(dict(source="csrc", job=cu.name, kernel="(nvcc)", arch=sm, error=run.stderr[-600:]))
                continue
            stats = parse_ptxas(run.stderr)
            text = disassemble(cubin.read_bytes()) if sass else ""
            funcs = sass_functions(text)
            nvdisasm = _tool("nvdisasm")
            lines = subprocess.run([nvdisasm, "--print-line-info", "-c", str(cubin)], capture_output=True, text=True,
                                   timeout=300).stdout if sass and nvdisasm and cu.name == SAMPLER_SOURCE else ""
        names = _demangle(list(stats))
        first = sampler_first_pass(text, lines, cu.read_text(), names) if lines else {}
        for mangled, st in sorted(stats.items(), key=lambda kv: names[kv[0]]):
            row = dict(source="csrc", job=cu.name, kernel=_short_name(names[mangled]), symbol=names[mangled], arch=sm,
                       default=True, **st)
            row.update(sass_summary(funcs.get(mangled, [])))
            kinds = [k for k, n in (("TMA", row.get("sass_tma_loads")), ("cp.async", row.get("sass_ldgsts")),
                                    ("ld.global", row.get("sass_ldg"))) if n]
            row["load_kind"] = "+".join(kinds) or "none"
            m = re.search(r"sample_kernel<([^,]+), true>", row["kernel"])
            if m and m.group(1) in first:
                row["first_pass"] = first[m.group(1)]
            rows.append(row)
            if echo:
                echo(row)
        if echo:
            if first:
                echo("  sampler first pass, SASS instructions per logit (common path / logits per iteration): " +
                     ", ".join(f"{t} {v['per_logit']} ({v['path_instructions']}/{v['logits_per_iteration']})"
                               for t, v in first.items()))
            echo(f"  ({cu.name}: {time.perf_counter() - t0:.1f} s)")
    return rows


# ---------------------------------------------------------------------------- sampler first pass

# The sampler's first pass (csrc/sampling.cu): the function whose chunk loop is measured.
# scan_row is the name it had before the rewrite (issue 11), kept so older sources measure.
SAMPLER_SOURCE = "sampling.cu"
SAMPLER_FIRST_PASS = ("scan_sample", "scan_row")


def sass_line_map(text: str) -> dict[str, dict[int, int]]:
    """``{function: {address: source line}}`` from ``nvdisasm --print-line-info`` (inlined code
    carries the line it was written on, in whichever function)."""
    out, current, line = {}, None, None
    for raw in text.splitlines():
        m = re.match(r"\.text\.(\S+):", raw)
        if m:
            current, line = out.setdefault(m.group(1), {}), None
            continue
        m = re.search(r'//## File "[^"]+", line (\d+)', raw)
        if m:
            line = int(m.group(1))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/", raw)
        if m and current is not None:
            current[int(m.group(1), 16)] = line
    return out


def _function_lines(source: str, names) -> tuple[int, int] | None:
    """First and last line (1-based) of the first ``__device__ void <name>(`` definition found,
    its end being the next line that is a lone ``}``."""
    lines = source.splitlines()
    for name in names:
        for i, text in enumerate(lines):
            if re.match(rf"__device__ void {name}\(", text):
                end = next((j for j in range(i + 1, len(lines)) if lines[j] == "}"), len(lines) - 1)
                return i + 1, end + 1
    return None


def common_path(body: list[tuple[int, str, str, bool]], need_ex2: int) -> int | None:
    """Fewest instructions on a path through a loop body (``body[0]`` the loop head, ``body[-1]``
    the back-edge branch) that executes at least ``need_ex2`` MUFU.EX2 and every 128-bit global
    load of the body. Branches leaving the body and backward branches inside it (inner loops,
    taken zero times) are not followed; a predicated instruction counts as issued."""
    index = {addr: i for i, (addr, _, _, _) in enumerate(body)}
    loads = sum(1 for _, op, _, _ in body if op.startswith("LDG") and ".128" in op)
    inf = float("inf")
    # best[i][(e, l)]: fewest instructions from the head to just before body[i], with e
    # exponentials (capped at need_ex2) and l wide loads on the way.
    best = [dict() for _ in range(len(body) + 1)]
    best[0][(0, 0)] = 0
    for i, (addr, op, args, predicated) in enumerate(body):
        for (e, l), n in list(best[i].items()):
            e2 = min(need_ex2, e + (op == "MUFU.EX2"))
            l2 = l + (op.startswith("LDG") and ".128" in op)
            n2 = n + 1
            if i == len(body) - 1:
                key = (e2, l2)
                best[i + 1][key] = min(best[i + 1].get(key, inf), n2)
                continue
            succ = []
            base = op.split(".")[0]
            if base in ("BRA", "JMP"):
                m = re.search(r"(0x[0-9a-f]+)", args)
                target = index.get(int(m.group(1), 16)) if m else None
                if target is not None and target > i:
                    succ.append(target)
                if predicated:
                    succ.append(i + 1)
            elif base in ("EXIT", "RET", "BPT"):
                if predicated:
                    succ.append(i + 1)
            else:
                succ.append(i + 1)
            for j in succ:
                best[j][(e2, l2)] = min(best[j].get((e2, l2), inf), n2)
    done = [n for (e, l), n in best[-1].items() if e >= need_ex2 and l >= loads]
    return min(done) if done else None


def sampler_first_pass(sass: str, line_text: str, source: str, symbols: dict[str, str]) -> dict[str, dict]:
    """SASS instructions per logit of the sampler's first pass, per vectorised instantiation
    (``sample_kernel<T, true>``: contiguous 16-byte-aligned rows, the common case).

    The loop: the outermost loop of the cubin whose head and back-edge branch both carry a
    source line of the first-pass function (from ``nvdisasm --print-line-info``, the cubin
    compiled with ``-lineinfo``, which does not change the code). Logits per iteration:
    16 / sizeof(T) per 128-bit global load in the loop body (each chunk of a thread is one
    16-byte load). The common path: the fewest instructions from the loop head to its back
    edge on which every logit of the iteration is exponentiated (at least that many
    MUFU.EX2) and every 128-bit load issues (common_path); rare work (candidate appends,
    a rising maximum, compaction) lies off it. Instructions per logit = common path /
    logits per iteration."""
    span = _function_lines(source, SAMPLER_FIRST_PASS)
    if span is None:
        return {}
    lo, hi = span
    lines = sass_line_map(line_text)
    out = {}
    for mangled, instrs in _sass_with_predicates(sass).items():
        name = symbols.get(mangled, mangled)
        m = re.search(r"sample_kernel<([^,]+), true>", name)
        if not m:
            continue
        where = lines.get(mangled, {})
        index = {addr: i for i, (addr, _, _, _) in enumerate(instrs)}
        loops = []
        for i, (addr, op, args, _) in enumerate(instrs):
            t = re.search(r"(0x[0-9a-f]+)", args) if op.split(".")[0] == "BRA" else None
            if t and int(t.group(1), 16) < addr and int(t.group(1), 16) in index:
                head = index[int(t.group(1), 16)]
                if all(lo <= (where.get(instrs[k][0]) or 0) <= hi for k in (head, i)):
                    loops.append((head, i))
        if not loops:
            continue
        head, back = max(loops, key=lambda hb: hb[1] - hb[0])
        body = instrs[head:back + 1]
        dtype = _short_name(m.group(1)) if m.group(1) != "float" else "float"
        items = 16 // {"float": 4}.get(m.group(1), 2)
        wide = sum(1 for _, op, _, _ in body if op.startswith("LDG") and ".128" in op)
        logits = items * max(wide, 1)
        path = common_path(body, logits)
        out[dtype] = dict(loop_instructions=len(body), wide_loads=wide, logits_per_iteration=logits,
                          path_instructions=path, ex2_on_path=logits,
                          per_logit=None if path is None else round(path / logits, 2))
    return out


def measure_sampler(arch: int = 90, source: Path | None = None) -> dict[str, dict]:
    """Compile csrc/sampling.cu (or ``source``) for ``sm_{arch}`` with the build's flags plus
    ``-lineinfo`` and measure its first pass (sampler_first_pass); also the registers and
    spills of every instantiation (``{"registers": {symbol: ptxas stats}}``)."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    if nvcc is None or cuobjdump is None or nvdisasm is None:
        raise FileNotFoundError("nvcc, cuobjdump and nvdisasm are needed to measure the sampler")
    source = Path(source or ROOT / "csrc" / SAMPLER_SOURCE)
    sm = f"sm_{arch}" + ("a" if arch >= 90 else "")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "sampling.cubin"
        cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}", f"-arch={sm}", "-cubin",
               "-lineinfo", "-Xptxas", "-v", str(source), "-o", str(cubin)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if run.returncode:
            raise RuntimeError(f"nvcc failed:\n{run.stderr[-3000:]}")
        stats = parse_ptxas(run.stderr)
        sass = disassemble(cubin.read_bytes())
        lines = subprocess.run([nvdisasm, "--print-line-info", "-c", str(cubin)], capture_output=True, text=True,
                               timeout=300).stdout
    names = _demangle(list(stats))
    out = sampler_first_pass(sass, lines, source.read_text(), names)
    out["registers"] = {_short_name(names[k]): v for k, v in stats.items()}
    return out


# ---------------------------------------------------------------------------- output


COLUMNS = [("job", "job", 40), ("kernel", "kernel", 28), ("config", "config", 30), ("regs", "regs", 4),
           ("spill st/ld", None, 11), ("stack", "stack", 5), ("smem KB", None, 7), ("wgmma", None, 18),
           ("wait", None, 4), ("load", "load_kind", 18), ("st", "stages", 2), ("CTA/SM", "ctas_per_sm", 6),
           ("waves", "waves", 6), ("SASS/iter", "loop_instructions", 9)]


def _config_text(row):
    c = row.get("config") or {}
    order = [k for k in ("BLOCK_M", "BLOCK_N", "BM", "BN", "BK", "BLOCK_R", "BLOCK_C", "BLOCK_H", "BS", "BI", "BT",
                         "ROWS", "R") if k in c]
    parts = [f"{k}={c[k]}" for k in order]
    if "num_warps" in c:
        parts.append(f"w{c['num_warps']}")
    if "num_stages" in c:
        parts.append(f"s{c['num_stages']}")
    parts += [k.lower() for k in ("SPLIT", "SPLIT_K") if c.get(k)]
    return ",".join(parts) + ("*" if row.get("default") and row["source"] == "triton" else "")


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['job'][:40]:<40}  {row['kernel'][:28]:<28}  ERROR {row['error'].splitlines()[0][:120]}"
    vals = []
    for title, key, width in COLUMNS:
        if title == "config":
            v = _config_text(row) if row["source"] == "triton" else "-"
        elif title == "spill st/ld":
            v = f"{row.get('spill_stores', '-')}/{row.get('spill_loads', '-')}"
        elif title == "smem KB":
            smem = row.get("smem", row.get("static_smem"))
            v = "-" if smem is None else f"{smem / 1024:.1f}"
        elif title == "wgmma":
            v = f"{row['wgmma']} {','.join(s.replace('k16', '') for s in row['wgmma_shapes'])}" if row.get("wgmma") \
                else f"tcgen05 {row['tcgen05_mma']}" if row.get("tcgen05_mma") \
                else ("mma" if row.get("mma_sync") else "-")
        elif title == "wait":
            v = ",".join(map(str, row.get("wgmma_wait_depths") or [])) or "-"
        else:
            v = row.get(key)
            v = "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
        vals.append(str(v)[:max(width, 40)].ljust(width))
    return "  ".join(vals).rstrip()


def header() -> str:
    return "  ".join(t.ljust(w) for t, _, w in COLUMNS) + "\n" + "  ".join("-" * w for _, _, w in COLUMNS)


def environment(arch: int) -> dict:
    import platform

    import triton

    from fastdf import __version__

    from .core import _git_commit

    nvcc = shutil.which("nvcc")
    version = None
    if nvcc:
        m = re.search(r"release (\S+),", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
        version = m.group(1) if m else None
    import datetime

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "fastdf": __version__,
            "commit": _git_commit(), "triton": triton.__version__, "nvcc": version, "python": platform.python_version(),
            "target": f"sm_{arch}" + ("a" if arch >= 90 else ""), "limits": LIMITS[arch],
            "note": "compiled ahead of time without a GPU; CTAs/SM and waves are computed, not measured"}


def build_report(arch: int = 90, ci: bool = False, groups=None, csrc: bool = True, sass: bool = True,
                 echo=None) -> dict:
    rows = triton_report(arch, ci=ci, groups=groups, sass=sass, echo=echo)
    env = environment(arch)
    env["csrc"] = "not compiled (--no-csrc)"
    if csrc:
        try:
            rows += csrc_report(arch, sass=sass, echo=echo)
            env["csrc"] = "compiled"
        except FileNotFoundError as err:  # a Triton-only install: report what can be compiled
            env["csrc"] = f"skipped: {err}"
            if echo:
                echo(f"csrc: {env['csrc']}")
    return {"environment": env, "mode": "ci" if ci else "full", "kernels": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdf.bench.compile", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90", help="comma-separated compute capabilities: 90 (sm_90a, default), "
                                                      "80, 100 (sm_100a)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON (one file; with several --arch, "
                                                       "one report per target inside it)")
    parser.add_argument("--ci", action="store_true", help="one shape per kernel group, every config "
                                                          "(what tests/bench/test_compile.py compiles)")
    parser.add_argument("--group", action="append", choices=sorted(JOB_GROUPS), help="Triton kernel group to compile "
                                                                                    "(repeatable; default: all)")
    parser.add_argument("--no-csrc", action="store_true", help="skip the nvcc compile of csrc/")
    parser.add_argument("--no-sass", action="store_true", help="skip cuobjdump (no SASS loop counts)")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        parser.error(f"--arch {args.arch!r}: give compute capabilities such as 90 or 80,90,100")
    bad = [a for a in archs if a not in LIMITS]
    if bad:
        parser.error(f"--arch: {bad} not supported (choose from {sorted(LIMITS)})")
    if args.json:
        from .cli import _check_output

        _check_output(parser, "--json", args.json)
    reports = {}
    t0 = time.perf_counter()
    for arch in archs:
        print(f"== sm_{arch}{'a' if arch >= 90 else ''} ({LIMITS[arch]['card']} limits, {LIMITS[arch]['sms']} SMs); "
              f"* = default config", flush=True)
        print(header(), flush=True)
        echo = lambda r: print(r if isinstance(r, str) else format_row(r), flush=True)  # noqa: E731
        reports[arch] = build_report(arch, ci=args.ci, groups=args.group, csrc=not args.no_csrc,
                                     sass=not args.no_sass, echo=echo)
    bad_rows = [r for rep in reports.values() for r in rep["kernels"] if "error" in r]
    print(f"compiled {sum(len(r['kernels']) for r in reports.values())} kernel configs in "
          f"{time.perf_counter() - t0:.0f} s; {len(bad_rows)} failed")
    if args.json:
        from .core import write_text

        data = reports[archs[0]] if len(archs) == 1 else {f"sm_{a}": r for a, r in reports.items()}
        write_text(args.json, json.dumps(data, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())
