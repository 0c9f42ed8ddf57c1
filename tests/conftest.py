"""Shared test options: `pytest --large` runs the same tests with GPU-sized shapes.

On CPU the kernels run in Triton's interpreter, one program instance at a time, so the default
shapes are tiny (but never multiples of the block sizes); on the GPU `--large` makes them real.
"""
import zlib

import jax
import numpy as np
import pytest

LARGE = False


def pytest_addoption(parser):
    parser.addoption("--large", action="store_true", help="GPU-sized shapes (slow on CPU)")


def pytest_configure(config):
    global LARGE
    LARGE = config.getoption("--large")
    jax.config.update("jax_default_matmul_precision", "highest")  # references in true fp32


def shapes(small, large):
    """Test cases for this run: `small` by default, `small + large` under --large."""
    return list(small) + list(large) if LARGE else list(small)


TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def assert_close(actual, expected, dtype=None, rtol=None, what=""):
    """Relative error ||actual - expected|| / ||expected|| under the dtype's tolerance, no NaN.
    `what` names the compared value in the failure message."""
    dtype = np.dtype(dtype or expected.dtype).name
    rtol = TOLERANCE[dtype] if rtol is None else rtol
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    what = f"{what}: " if what else ""
    assert a.shape == e.shape, f"{what}shape {a.shape} != {e.shape}"
    assert np.isfinite(a).all(), f"{what}{(~np.isfinite(a)).sum()} non-finite values (unwritten outputs?)"
    err = relative_error(a, e)
    assert err <= rtol, f"{what}relative error {err:.3g} > {rtol:g} ({dtype})"


@pytest.fixture(autouse=True)
def poison_gpu_memory():
    """On the GPU, fill freed device memory with NaN before each test.

    The CPU path NaN-fills every kernel output itself (jtgpt/call.py); on the GPU, XLA allocates
    the outputs, so this leaves NaN in the allocator's free pool, where the test's outputs will
    most likely be placed: an element a kernel fails to write then reads as NaN, not stale data.
    """
    if jax.default_backend() == "gpu":
        jax.block_until_ready(jax.numpy.full((256 * 2**20,), jax.numpy.nan, jax.numpy.float32))
    yield


@pytest.fixture
def key(request):
    """A fresh random key per test, seeded by the test's name so failures reproduce."""
    return jax.random.key(zlib.crc32(request.node.name.encode()))
