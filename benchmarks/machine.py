"""What every benchmark JSON records about the machine that produced it (one helper for all scripts).

A timing means little without its machine: the CPU model and what ATen's kernels use of it
(``torch.backends.cpu.get_cpu_capability()``), the thread count, the torch version, the allocator
setting, and how busy the machine was (load average at the start and at the end of the run).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from bimask_hf.search import _int8_matmul_faster

__all__ = ["cpu_model", "describe", "machine_info", "finish_machine_info", "write_json"]


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``'s model name on Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _int8_flags() -> list[str]:
    """The CPU's int8 dot-product flags (VNNI, AMX) from ``/proc/cpuinfo``: what makes ``torch._int_mm`` fast."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if "vnni" in f or f.startswith("amx"))
    except OSError:
        pass
    return []


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # Windows has no load average
        return None


def machine_info(threads: int | list[int] | None = None, allocator: str | None = None) -> dict:
    """The machine and settings a benchmark runs on, taken at its start.

    Args:
        threads: the torch thread count(s) the benchmark uses (default: the current one).
        allocator: how the benchmark set up memory allocation (default: glibc's defaults unless
            ``LD_PRELOAD`` or ``MALLOC_*`` variables change it; those are recorded under ``env``).

    Returns:
        A JSON-ready dict; :func:`finish_machine_info` adds the load average at the end.
    """
    env = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "PYTORCH_CPU_ALLOC"))
           or k == "LD_PRELOAD"}
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "allocator": allocator or "default",
        "env": env,  # allocator (LD_PRELOAD, MALLOC_*) and OpenMP settings from the environment
        "int8_dot_flags": _int8_flags(),
        "search_matmul": "int8" if _int8_matmul_faster() else "float",
        "loadavg_start": _load(),
    }


def finish_machine_info(info: dict) -> dict:
    """``info`` with the load average at the end of the run (1, 5 and 15 minutes)."""
    return {**info, "loadavg_end": _load()}


def write_json(path: str | Path | None, info: dict, **payload: object) -> None:
    """Write ``{"machine": info (with the load at the end), **payload}`` to ``path`` (nothing when None)."""
    if path:
        import json

        Path(path).write_text(json.dumps({"machine": finish_machine_info(info), **payload}, indent=1))


def describe(info: dict) -> str:
    """One line for a benchmark's printed header."""
    load = "/".join(map(str, info["loadavg_start"])) if info["loadavg_start"] else "n/a"
    return (f"machine: {info['cpu_model']} ({info['cpu_count']} CPUs, ATen {info['cpu_capability']}, int8 dot "
            f"{','.join(info['int8_dot_flags']) or 'none'}, search matmul {info['search_matmul']}), "
            f"{info['threads']} thread(s), torch {info['torch']}, allocator {info['allocator']}, load {load}")


if __name__ == "__main__":
    import json

    print(json.dumps(finish_machine_info(machine_info()), indent=1))
