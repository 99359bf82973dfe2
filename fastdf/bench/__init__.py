"""Benchmark suites and the CLI behind ``python -m fastdf.bench`` (DESIGN.md §6)."""

from .core import SUITES, Case, Skip, load_suites, run, suite

__all__ = ["SUITES", "Case", "Skip", "load_suites", "run", "suite"]
