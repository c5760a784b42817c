"""Shared by the benchmark scripts (importable because a script's own folder is on sys.path)."""

from __future__ import annotations

import os


def load_avg() -> str:
    """The 1/5/15-minute load averages and the CPU count, printed with every figure on shared hosts."""
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "n/a"
