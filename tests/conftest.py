"""Test harness: 8 emulated CPU devices, offline Hugging Face, deterministic torch.

XLA_FLAGS must be set before jax is first imported, so it is set here as well as in
launch/test.sh (for `pytest` run by hand).
"""

import getpass
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One compilation cache for the whole run, shared by the xdist workers and the commands the
# tests start as subprocesses (they inherit the variable): most tests compile the same tiny
# programs. Kept between runs; `REALM_JAX_COMPILE_CACHE=off` for a run that compiles all.
os.environ.setdefault("REALM_JAX_COMPILE_CACHE", os.path.join(
    tempfile.gettempdir(), f"realm_jax_test_xla_{getpass.getuser()}"))

import jax  # noqa: E402
import pytest  # noqa: E402

from realm_jax import compile_cache  # noqa: E402

compile_cache.enable()


@pytest.fixture(scope="session")
def eight_devices():
    devices = jax.devices()
    assert len(devices) == 8, (
        f"tests need 8 emulated devices, got {len(devices)}: run them through ./launch/test.sh "
        "or set XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported"
    )
    return devices


@pytest.fixture
def benchmark_module(monkeypatch):
    """`benchmark_module("refresh_speed")` → benchmarks/refresh_speed.py as a module, with
    benchmarks/ on sys.path as when it runs as a script (bench_utils, mips beside it)."""
    import importlib.util

    benchmarks = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "benchmarks")
    monkeypatch.syspath_prepend(benchmarks)

    def load(name: str):
        spec = importlib.util.spec_from_file_location(
            f"{name}_bench", os.path.join(benchmarks, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
