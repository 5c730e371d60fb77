"""Test setup: 8 host CPU devices (set before jax is imported) and tiny model configs."""

import atexit
import os
import shutil
import tempfile

# The tests' programs are tiny and run a few steps each, so XLA's compile time dominates:
# LLVM at -O1 compiles them ~2x faster than the default -O3 and runs them ~1.5x slower (-O0:
# ~3.5x faster, but ~3x slower to run, a loss for the tests that train for hundreds of steps).
# The optimised HLO is the same; float results may differ in the last bits. Set
# --xla_backend_optimization_level in XLA_FLAGS yourself to override.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    ""
    if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "")
    else " --xla_backend_optimization_level=1"
)
os.environ["XLA_FLAGS"] = (
    os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache per test session, shared with the pytest-xdist workers and
# the launch.py subprocesses (they inherit the environment): tests that build the same tiny
# model compile its step once instead of once per test. The process that creates it removes
# it at exit, so no run leaves it behind in the temp dir.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="scott_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax
import pytest

from scott_jax.models import build_encoder


@pytest.fixture(scope="session")
def tiny_encoder_kwargs():
    """A SCOTT small enough to compile in seconds: 64 px (4x4 tokens), depth 2, width 64."""
    return dict(embed_dim=64, depth=2, num_heads=4)


@pytest.fixture(scope="session")
def tiny_scott(tiny_encoder_kwargs):
    return build_encoder("scott-7/16", 64, **tiny_encoder_kwargs)


@pytest.fixture(scope="session")
def tiny_vit(tiny_encoder_kwargs):
    return build_encoder("vit-7/16", 64, **tiny_encoder_kwargs)


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
