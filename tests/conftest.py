"""Shared test options: `pytest --large` runs the same tests with GPU-sized shapes.

On CPU the kernels run in Triton's interpreter, one program instance at a time, so the default
shapes are tiny (but never multiples of the block sizes); on the GPU `--large` makes them real.
The CPU platform shows 8 devices (set before JAX starts its backends), so that the data-parallel
tests split their work over 8 devices on a machine without a GPU.
"""
import os
import zlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

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


# ------------------------------------------------------------------- shared by the model tests

def left_padding(B, T):
    """[B, T] int32 attention mask: row 0 unpadded, up to a third of the last row padding."""
    pads = jnp.arange(B) * (T // 3) // max(B - 1, 1)
    return (jnp.arange(T)[None, :] >= pads[:, None]).astype(jnp.int32)


def lm_labels(ids, mask):
    """ids as labels, -100 on padding and on one column. Also -100 where the previous token is
    padding: that label would be scored from a padded query, which sees no key here (zeros) and
    some average in Hugging Face, so the two are compared on real queries only."""
    previous = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)), constant_values=1)
    return jnp.where((mask == 0) | (previous == 0), -100, ids).at[:, 2].set(-100)


def assert_gradient_matches_finite_differences(loss_fn, params, key):
    """The directional derivative <grad loss_fn(params), v> along a random unit direction v
    against a central difference of the loss, in fp32."""
    grads = jax.jit(jax.grad(loss_fn))(params)
    leaves, treedef = jax.tree.flatten(params)
    direction = [jax.random.normal(k, leaf.shape) for k, leaf in
                 zip(jax.random.split(key, len(leaves)), leaves)]
    norm = jnp.sqrt(sum(jnp.sum(d * d) for d in direction))
    direction = jax.tree.unflatten(treedef, [d / norm for d in direction])
    eps = 5e-2  # fp32 rounding of the loss (~5e-7) stays ~1e-5 of the difference quotient
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)  # noqa: E731
    numeric = (float(loss_fn(shifted(1.0))) - float(loss_fn(shifted(-1.0)))) / (2 * eps)
    analytic = float(sum(jnp.sum(g * d) for g, d in
                         zip(jax.tree.leaves(grads), jax.tree.leaves(direction))))
    assert abs(analytic) > 1e-3  # a direction the loss actually moves along
    assert abs(numeric - analytic) <= 1e-2 * abs(analytic), (numeric, analytic)
