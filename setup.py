"""Build script for fastdf.

The Python package is pure; `fastdf._C` (csrc/, CUDA + pybind11) is built when nvcc is
found, and `fastdf._cpu` (csrc/cpu/, host C++ + OpenMP + pybind11: the CPU path's own
kernels, for x86-64 CPUs with AVX-512) when the host C++ compiler builds it. csrc/ includes no torch headers, so the extension compiles on a CPU-only machine
and loads under any torch version. cudart is linked statically, so `import fastdf._C`
works on a machine without a GPU; its entry points raise a clear error there.

Knobs (environment variables):
  FASTDF_FORCE_CUDA=1        fail unless fastdf._C is built
  FASTDF_SKIP_CUDA_BUILD=1   never build fastdf._C
  FASTDF_FORCE_CPU=1         fail unless fastdf._cpu is built
  FASTDF_SKIP_CPU_BUILD=1    never build fastdf._cpu
  FASTDF_CUDA_ARCHS          ';'-separated targets, default "80;90a" (append +PTX to
                             also embed PTX, e.g. "80;90a;100+PTX")
  MAX_JOBS                   parallel nvcc jobs (default: from cores and free memory)
  CUDA_HOME                  where to look for bin/nvcc first
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90a"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    if not os.environ.get("CUDA_HOME") and default.is_file():
        return str(default)
    return None


def gencode_flags(archs):
    flags = []
    for entry in archs.replace(",", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        arch = entry.removesuffix("+PTX").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise SystemExit(
                f"FASTDF_CUDA_ARCHS: cannot read {entry!r}; expected compute capabilities "
                "such as '80;90a' or '80;90a;100+PTX'"
            )
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    if not flags:
        raise SystemExit("FASTDF_CUDA_ARCHS is empty; unset it to build for '80;90a'")
    return flags


def default_jobs():
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = os.cpu_count() or 1
    free_gib = 4.0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    # nvcc with several -gencode targets peaks near 2 GiB per job.
    return max(1, min(cores, int(free_gib // 2)))


def cuda_sources():
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.c[pu]*") if p.suffix in {".cu", ".cpp"})


class BuildExt(build_ext):
    """Compiles csrc/ with nvcc (through ninja when available) and links with nvcc."""

    def build_extension(self, ext):
        if ext.name == "fastdf._cpu":
            return self._build_cpu(ext)
        if ext.name != "fastdf._C":
            return super().build_extension(ext)
        import pybind11

        nvcc = find_nvcc()
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp).resolve() / "csrc"
        tmp.mkdir(parents=True, exist_ok=True)
        cflags = [
            "-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr",
            "-Xcompiler", "-fPIC,-fvisibility=hidden",
            f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}", f"-I{CSRC}",
            *gencode_flags(os.environ.get("FASTDF_CUDA_ARCHS", DEFAULT_ARCHS)),
        ]
        ldflags = ["-shared", "--cudart", "static", "-Xcompiler", "-fPIC"]
        sources = [ROOT / s for s in ext.sources]
        objects = [tmp / (s.name + ".o") for s in sources]
        jobs = default_jobs()
        print(f"fastdf: building {ext.name} from {len(sources)} files with {nvcc} ({jobs} jobs)")
        ninja = shutil.which("ninja")
        if ninja:
            self._ninja(ninja, nvcc, cflags, ldflags, sources, objects, out, tmp, jobs)
        else:
            self._pool(nvcc, cflags, ldflags, sources, objects, out, jobs)

    def _build_cpu(self, ext):
        """The host compiler, through setuptools; a failure is a warning unless
        FASTDF_FORCE_CPU=1 (the CPU path then runs on aten's kernels alone)."""
        import pybind11

        ext.include_dirs.append(pybind11.get_include())
        try:
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 (compiler errors come in several types)
            if env_flag("FASTDF_FORCE_CPU"):
                raise
            sys.stderr.write(f"WARNING: fastdf: could not build fastdf._cpu ({err}); the CPU path runs without "
                             "its own kernels. FASTDF_FORCE_CPU=1 makes this an error.\n")

    @staticmethod
    def _ninja(ninja, nvcc, cflags, ldflags, sources, objects, out, tmp, jobs):
        q = lambda args: " ".join(a.replace(" ", "$ ") for a in args)  # noqa: E731
        lines = [
            "ninja_required_version = 1.3",
            f"rule nvcc\n  command = {nvcc} {q(cflags)} -MD -MF $out.d -c $in -o $out\n"
            "  depfile = $out.d\n  deps = gcc\n  description = nvcc $in",
            f"rule link\n  command = {nvcc} {q(ldflags)} $in -o $out\n  description = link $out",
        ]
        lines += [f"build {q([str(o)])}: nvcc {q([str(s)])}" for s, o in zip(sources, objects)]
        lines.append(f"build {q([str(out)])}: link {q([str(o) for o in objects])}")
        (tmp / "build.ninja").write_text("\n".join(lines) + "\n")
        subprocess.run([ninja, "-C", str(tmp), "-j", str(jobs)], check=True)

    @staticmethod
    def _pool(nvcc, cflags, ldflags, sources, objects, out, jobs):
        headers = max((p.stat().st_mtime for p in CSRC.glob("*.*h")), default=0)

        def compile_one(pair):
            src, obj = pair
            if obj.exists() and obj.stat().st_mtime > max(src.stat().st_mtime, headers):
                return
            print(f"nvcc {src.name}", flush=True)
            subprocess.run([nvcc, *cflags, "-c", str(src), "-o", str(obj)], check=True)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(compile_one, zip(sources, objects)))
        subprocess.run([nvcc, *ldflags, *map(str, objects), "-o", str(out)], check=True)


def cpu_extensions():
    if env_flag("FASTDF_SKIP_CPU_BUILD"):
        if env_flag("FASTDF_FORCE_CPU"):
            raise SystemExit("FASTDF_FORCE_CPU=1 and FASTDF_SKIP_CPU_BUILD=1 contradict each other; unset one")
        return []
    import platform

    if sys.platform != "linux" or platform.machine() not in {"x86_64", "AMD64"}:
        if env_flag("FASTDF_FORCE_CPU"):
            raise SystemExit(f"fastdf: FASTDF_FORCE_CPU=1 but fastdf._cpu builds on x86-64 Linux only "
                             f"(this is {sys.platform} {platform.machine()})")
        return []
    flags = ["-std=c++17", "-O3", "-fopenmp", "-fvisibility=hidden", "-Wno-psabi"]
    sources = ["csrc/cpu/attention.cpp", "csrc/cpu/adaln.cpp", "csrc/cpu/moe.cpp"]
    return [Extension("fastdf._cpu", sources=sources, extra_compile_args=flags,
                      extra_link_args=["-fopenmp"], language="c++")]


def extensions():
    return cpu_extensions() + cuda_extensions()


def cuda_extensions():
    if env_flag("FASTDF_SKIP_CUDA_BUILD"):
        if env_flag("FASTDF_FORCE_CUDA"):
            raise SystemExit("FASTDF_FORCE_CUDA=1 and FASTDF_SKIP_CUDA_BUILD=1 contradict each other; unset one")
        print("fastdf: FASTDF_SKIP_CUDA_BUILD=1, installing without fastdf._C (cuda backend unavailable)")
        return []
    if find_nvcc() is None:
        if env_flag("FASTDF_FORCE_CUDA"):
            raise SystemExit(
                "fastdf: FASTDF_FORCE_CUDA=1 but nvcc was not found (looked in $CUDA_HOME/bin, "
                "$PATH, and /usr/local/cuda/bin when CUDA_HOME is unset). Install the CUDA toolkit, or point CUDA_HOME at it, "
                "or unset FASTDF_FORCE_CUDA to install without the cuda backend."
            )
        sys.stderr.write(
            "WARNING: fastdf: nvcc not found; installing without fastdf._C, so the 'cuda' "
            "backend is unavailable (Triton and torch backends still work). Set CUDA_HOME or put "
            "nvcc on PATH and reinstall to build it.\n"
        )
        return []
    gencode_flags(os.environ.get("FASTDF_CUDA_ARCHS", DEFAULT_ARCHS))  # refuse a bad list before building
    return [Extension("fastdf._C", sources=cuda_sources())]


setup(
    packages=find_packages(include=["fastdf", "fastdf.*"]) + ["fastdf.kernels"],
    package_dir={"fastdf.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
