"""jtgpt.call.triton_call: the calling convention, jit, custom_vjp, and the interpreter shims."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl
from conftest import assert_close

from jtgpt.call import on_gpu, triton_call


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, alpha, out_ptr, half_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    """out = alpha * x + y (alpha a runtime scalar), and half = x / 2 cast to half's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=ok).to(tl.float32)
    tl.store(out_ptr + offs, (alpha * x + y).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(half_ptr + offs, (x * 0.5).to(half_ptr.dtype.element_ty), mask=ok)


def axpy(alpha, x, y):
    n = x.size
    return triton_call(x, y, float(alpha), kernel=_axpy_kernel,
                       out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),) * 2,
                       grid=(triton.cdiv(n, 32),), N=n, BLOCK=32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_outputs_after_inputs_and_scalars_under_jit(key, dtype):
    x, y = jax.random.normal(key, (2, 77), jnp.float32).astype(dtype)
    out, half = jax.jit(lambda x, y: axpy(3.0, x, y))(x, y)
    assert out.dtype == half.dtype == dtype
    assert_close(out, (3.0 * x.astype(jnp.float32) + y.astype(jnp.float32)).astype(dtype))
    assert_close(half, (x.astype(jnp.float32) * 0.5).astype(dtype))


def test_single_out_shape_returns_an_array(key):
    x = jax.random.normal(key, (40,))

    @triton.jit
    def copy_kernel(x_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)

    out = triton_call(x, kernel=copy_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                      grid=(1,), N=40, BLOCK=64)
    np.testing.assert_array_equal(out, x)


def test_aliased_output_keeps_what_the_kernel_does_not_write(key):
    """An output aliased to an input is that input's buffer: the kernel (given a scalar before
    it, so jax-triton's array numbering differs from args') writes every other element, the rest
    keeps the input's values; the input array itself is unchanged outside jit and inside."""

    @triton.jit
    def scale_even_kernel(scale, x_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
        offs = 2 * tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < N)
        tl.store(out_ptr + offs, x * scale, mask=offs < N)

    def scale_even(x):
        return triton_call(3.0, x, kernel=scale_even_kernel, input_output_aliases={1: 0},
                           out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(1,),
                           N=x.size, BLOCK=32)

    x = jax.random.normal(key, (37,))
    want = np.asarray(x).copy()
    want[::2] *= 3.0
    for f in (scale_even, jax.jit(scale_even), jax.jit(lambda x: (scale_even(x), x + 0))):
        out = f(x)
        out = out[0] if isinstance(out, tuple) else out
        np.testing.assert_allclose(out, want, rtol=1e-6)
    np.testing.assert_array_equal(jax.jit(lambda x: (scale_even(x), x))(x)[1], x)
    with pytest.raises(ValueError, match="input_output_aliases: argument 1"):
        triton_call(3.0, x, kernel=scale_even_kernel, input_output_aliases={1: 0},
                    out_shape=jax.ShapeDtypeStruct((36,), x.dtype), grid=(1,), N=36, BLOCK=32)


def test_kernels_differentiate_inside_custom_vjp(key):
    """A custom_vjp whose forward and backward are both Triton kernels, under jit and grad."""

    @jax.custom_vjp
    def scaled_sum(x, y):  # 2x + y, through the kernel
        return axpy(2.0, x, y)[0]

    def fwd(x, y):
        return scaled_sum(x, y), None

    def bwd(_, g):  # d/dx = 2g, d/dy = g: the first again through the kernel (2g + 0)
        return axpy(2.0, g, jnp.zeros_like(g))[0], g

    scaled_sum.defvjp(fwd, bwd)
    x, y = jax.random.normal(key, (2, 50))
    gx, gy = jax.jit(jax.grad(lambda x, y: jnp.sum(jnp.sin(scaled_sum(x, y))), argnums=(0, 1)))(x, y)
    expected = jnp.cos(2 * x + y)
    assert_close(gx, 2 * expected)
    assert_close(gy, expected)


@pytest.mark.skipif(on_gpu(), reason="XLA allocates GPU outputs; conftest poisons its free pool")
def test_unwritten_outputs_are_nan_on_the_interpreter(key):
    x = jax.random.normal(key, (64,))

    @triton.jit
    def first_half_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs))

    out = np.asarray(triton_call(x, kernel=first_half_kernel,
                                 out_shape=jax.ShapeDtypeStruct((64,), jnp.float32), grid=(1,), BLOCK=32))
    np.testing.assert_array_equal(out[:32], x[:32])
    assert np.isnan(out[32:]).all()


def test_bf16_cast_rounds_to_nearest_even():
    """The interpreter truncated fp32 -> bf16; the GPU rounds to nearest even, and so must we."""

    @triton.jit
    def cast_kernel(x_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < N)
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=offs < N)

    # Just past a bf16 halfway point, exact ties (to even: down, then up), a negative one, a value
    # that rounds up into the next exponent, the largest finite, and a subnormal.
    x = jnp.array([1.0039063, 1.00390625, 1.01171875, -1.0039063, 1.9980469, 3.0e38, 1e-40],
                  jnp.float32)
    out = triton_call(x, kernel=cast_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                      grid=(1,), N=x.size, BLOCK=8)
    np.testing.assert_array_equal(out.astype(jnp.float32), x.astype(jnp.bfloat16).astype(jnp.float32))


def test_bf16_dot_multiplies_values_not_bits(key):
    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        a = tl.load(a_ptr + r[:, None] * N + r[None, :])
        b = tl.load(b_ptr + r[:, None] * N + r[None, :])
        tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))

    a, b = jax.random.normal(key, (2, 16, 16)).astype(jnp.bfloat16)
    c = triton_call(a, b, kernel=dot_kernel, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
                    grid=(1,), N=16)
    assert_close(c, a.astype(jnp.float32) @ b.astype(jnp.float32), rtol=1e-5)


def test_gpu_kernels_leave_their_triton_ir_out_of_the_call():
    """jaxlib hashes a launch's whole serialized call on the host at every launch: the kernel
    object jax-triton builds gets the PTX but not the Triton IR; the rest of jaxlib's library is
    jaxlib's."""
    from jtgpt.call import _KernelCallLib

    class FakeLib:
        TritonKernel = staticmethod(lambda *args: args)
        get_compute_capability = "jaxlib's own"

    lib = _KernelCallLib(FakeLib())
    assert lib.TritonKernel("k", 4, 1, 0, "ptx", "ttir", 90) == ("k", 4, 1, 0, "ptx", "", 90)
    assert lib.get_compute_capability == "jaxlib's own"


def test_gpu_kernels_build_without_line_info(monkeypatch):
    """Within _without_line_info Triton builds without line information (smaller PTX), unless
    TRITON_DISABLE_LINE_INFO says otherwise; the knob comes back as it was."""
    from jtgpt.call import _without_line_info
    compilation = triton.knobs.compilation
    monkeypatch.delenv("TRITON_DISABLE_LINE_INFO", raising=False)
    with compilation.scope():
        del compilation.disable_line_info  # the default: line information on
        assert compilation.disable_line_info is False
        with _without_line_info():
            assert compilation.disable_line_info is True
        assert compilation.disable_line_info is False
        monkeypatch.setenv("TRITON_DISABLE_LINE_INFO", "0")
        with _without_line_info():
            assert compilation.disable_line_info is False


def test_gpu_calls_become_typed_ffi_calls():
    """jax-triton 0.3.1's legacy custom call (the kernel call as a backend_config string) is
    rewritten into exactly what jax.ffi emits for jaxlib's typed-FFI Triton target with the same
    bytes as its `opaque` attribute: same operands, results, layouts and aliases."""
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    from jtgpt.call import _FFI_TARGET, _as_typed_ffi_call

    opaque = b"x\x9c\x00kernel call\xff"
    legacy = Primitive("legacy_triton_call")
    legacy.def_abstract_eval(lambda x, y: (x, x))
    legacy.multiple_results = True
    legacy_rule = jax.ffi.ffi_lowering("triton_kernel_call", api_version=2, backend_config=opaque,
                                       operand_output_aliases={1: 0})
    mlir.register_lowering(legacy, _as_typed_ffi_call(legacy_rule))

    def typed(x, y):
        out = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.ffi.ffi_call(_FFI_TARGET, (out, out), input_output_aliases={1: 0})(
            x, y, opaque=opaque)

    def custom_call(f, *args):
        text = jax.jit(f).lower(*args).as_text()
        [line] = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
        return line.split(" loc(")[0]

    x, y = jnp.ones((3, 5)), jnp.zeros((3, 5))
    rewritten = custom_call(legacy.bind, x, y)
    assert rewritten == custom_call(typed, x, y)
    assert "triton_kernel_call_ffi" in rewritten and "opaque" in rewritten
    assert "@triton_kernel_call(" in custom_call(
        lambda x, y: jax.ffi.ffi_call("triton_kernel_call", (x, x), custom_call_api_version=2,
                                      legacy_backend_config=opaque)(x, y), x, y)
