"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, which puts
this directory on sys.path)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def cpu_busy_elsewhere(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` while this process sleeps (other load)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]  # idle + iowait
        return sum(v) - idle, sum(v)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except OSError:
        return float("nan")
    return (busy1 - busy0) / max(total1 - total0, 1)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None
               ) -> argparse.Namespace:
    """`parser.parse_args` taking `--flag_name` as well as `--flag-name`: every realm_jax
    command spells its flags with underscores (absl), so a benchmark takes that spelling too."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fixed = []
    for a in argv:
        if a.startswith("--") and not a.startswith("---"):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("_", "-") + eq + value
        fixed.append(a)
    return parser.parse_args(fixed)


def wait_for_idle(max_wait_s: float, threshold: float = 0.1) -> float:
    """Sleep (in ~5 s probes) until other processes use < threshold of the CPUs, or time
    out; returns the last share measured."""
    t0 = time.monotonic()
    busy = cpu_busy_elsewhere()
    while busy >= threshold and time.monotonic() - t0 < max_wait_s:
        print(f"  {busy:.0%} of the CPUs busy elsewhere; waiting ...", flush=True)
        time.sleep(4.0)
        busy = cpu_busy_elsewhere()
    return busy


def write_json(path: str, results: dict) -> None:
    """The benchmark's JSON (parent folders made; non-JSON values as strings)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"\nwrote {path}")
