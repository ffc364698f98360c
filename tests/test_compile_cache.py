"""XLA's persistent compilation cache: where it goes, that it fills, that "off" turns it off."""

import os
import subprocess
import sys

from realm_jax import compile_cache

PROGRAM = """
import jax, jax.numpy as jnp
from realm_jax import compile_cache
print(compile_cache.enable())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache even a tiny one
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((4, 4))).sum()))
"""


def run(env_value: str) -> list[str]:
    env = {**os.environ, compile_cache.ENV: env_value, "XLA_FLAGS": ""}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    return done.stdout.split()


def test_directory_follows_the_environment(monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv(compile_cache.ENV, "/x/y")
    assert compile_cache.directory() == "/x/y"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.directory() is None
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/jax/own")
    assert compile_cache.directory() == "/jax/own"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert compile_cache.directory() == os.path.expanduser("~/.cache/realm_jax/xla")


def test_a_compiled_program_lands_in_the_cache_and_off_turns_it_off(tmp_path):
    on = tmp_path / "cache"
    assert run(str(on))[0] == str(on)
    assert any(name.endswith("-cache") for name in os.listdir(on))
    assert run("off")[0] == "None"


def test_a_directory_that_cannot_be_made_turns_the_cache_off(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level("WARNING", logger="realm_jax.compile_cache"):
        assert compile_cache.enable(str(blocker / "cache")) is None
    assert "compilation cache off: cannot write to" in caplog.text
