"""triton_call(): run an ordinary `@triton.jit` kernel on JAX arrays, on GPU or CPU.

This is the one module that knows about platforms:

- GPU: `jax_triton.triton_call`, which lowers to an XLA custom call, so the kernel runs inside
  `jax.jit`, `jax.custom_vjp`, `lax.scan`, ... like any other op; the call is jaxlib's typed-FFI
  Triton target, which XLA records into CUDA graphs (`_as_typed_ffi_call`). jax-triton is
  imported only on this path: it raises ImportError on a CPU-only jaxlib.
- CPU: `jax.pure_callback` into Triton's interpreter, which runs the same kernel one program
  instance at a time on torch CPU tensors (slow: for tests and tiny shapes only). Every float
  output is filled with NaN before the kernel runs, so an element the kernel fails to write shows
  up in any comparison.

`compile_only()` makes the same calls compile each kernel for an NVIDIA GPU instead of running
it (Triton ships ptxas: no GPU needed), so CI on a CPU machine catches what only the GPU compiler
rejects, and shows each kernel's registers, spills and shared memory.

Calling convention (jax-triton's): the kernel takes the array and scalar `args` in order, then
one pointer per output, then the `constexprs` as keyword arguments. An output aliased to an input
(`input_output_aliases`) is that input's buffer: the kernel's pointers to both are one address,
and whatever the kernel does not write keeps the input's values. Shapes and strides should go
in as constexprs: jax-triton 0.3 does not specialise integer scalars, and a GEMM with runtime
sizes ran 3.3x slower on an H100. Values that change between calls of one compiled
program (a decode position) go in as arrays instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import re
import subprocess
import threading
from typing import Any, Sequence

import jax
import numpy as np

ShapeDtype = jax.ShapeDtypeStruct


def on_gpu() -> bool:
    """Kernels run (or, under compile_only, are built) for the GPU, else in the interpreter."""
    return _compile_log is not None or jax.default_backend() == "gpu"


def gpu_capability() -> int | None:
    """The NVIDIA compute capability kernels are built for (90 for an H100); None in the
    interpreter and on GPUs that have none (AMD)."""
    if _compile_log is not None:
        return _compile_capability
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if jax.default_backend() != "gpu" or capability is None:
        return None
    major, minor = capability.split(".")
    return 10 * int(major) + int(minor)


def triton_call(*args: Any, kernel, out_shape: ShapeDtype | Sequence[ShapeDtype], grid: tuple[int, ...],
                num_warps: int = 4, num_stages: int = 2,
                input_output_aliases: dict[int, int] | None = None, **constexprs: Any):
    """Launch `kernel` over `grid` on `args`; returns one array per entry of `out_shape`.

    `out_shape` may be a single `jax.ShapeDtypeStruct` (one array back) or a sequence (a tuple
    back). `args` are JAX arrays or Python scalars (runtime kernel arguments).
    `input_output_aliases` {index into args: index into the outputs}: that output is written in
    place into that input's buffer (same shape and dtype), so a kernel can fill part of an array
    another kernel made without a copy (XLA copies the input first only if it is still needed).
    """
    single = not isinstance(out_shape, (list, tuple))
    out_shapes = (out_shape,) if single else tuple(out_shape)
    grid = tuple(int(g) for g in grid)
    aliases = dict(input_output_aliases or {})
    for i, o in aliases.items():
        arg, out = args[i], out_shapes[o]
        if (tuple(arg.shape), arg.dtype) != (tuple(out.shape), out.dtype):
            raise ValueError(f"input_output_aliases: argument {i} {arg.shape} {arg.dtype} "
                             f"cannot be output {o} {out.shape} {out.dtype}")
    if _compile_log is not None:
        outs = _compile_call(args, kernel, out_shapes, num_warps, num_stages, constexprs)
    elif on_gpu():
        outs = _gpu_call(args, kernel, out_shapes, grid, num_warps, num_stages, aliases, constexprs)
    elif kernel.is_gluon():
        raise NotImplementedError(f"{kernel.fn.__name__} is a Gluon kernel: it runs on the GPU "
                                  f"only (Triton's interpreter cannot run Gluon)")
    else:
        outs = _cpu_call(args, kernel, out_shapes, grid, num_warps, num_stages, aliases, constexprs)
    return outs[0] if single else tuple(outs)


# ----------------------------------------------------------------------------------------- GPU

def _gpu_call(args, kernel, out_shapes, grid, num_warps, num_stages, aliases, constexprs):
    jax_triton = _jax_triton()
    # jax-triton numbers the aliased inputs among the array arguments only.
    array_aliases = {sum(hasattr(a, "shape") for a in args[:i]): o for i, o in aliases.items()}
    # jax-triton 0.4 renamed `out_shape` to `out_type`; 0.3.1 is the one that works with the
    # triton 3.6 this project pins, so both are supported.
    params = inspect.signature(jax_triton.triton_call).parameters
    out_kw = "out_type" if "out_type" in params else "out_shape"
    outs = jax_triton.triton_call(*args, kernel=kernel, grid=grid, num_warps=num_warps,
                                  num_stages=num_stages, **{out_kw: list(out_shapes)},
                                  input_output_aliases=array_aliases, **constexprs)
    return tuple(outs)


@functools.cache
def _jax_triton():
    """jax_triton, imported without its side effect on the rest of the process.

    jax-triton 0.3.1 sets TRITON_CACHE_DIR="" when imported, after which every other Triton
    compile in the process (compile_only, torch.compile) fails with "Could not create or locate
    cache dir". The variable is put back as it was.
    """
    saved = os.environ.get("TRITON_CACHE_DIR")
    import jax_triton
    if saved is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = saved
    lib = jax_triton.triton_lib
    if _FFI_TARGET in _kernel_call_registrations(lib.triton_kernel_call_lib):
        from jax.interpreters import mlir
        mlir.register_lowering(lib.triton_kernel_call_p, _as_typed_ffi_call(
            functools.partial(lib.triton_kernel_call_lowering, lib.get_cuda_backend)),
            platform="cuda")
    lib.triton_kernel_call_lib = _KernelCallLib(lib.triton_kernel_call_lib)
    lib.get_or_create_triton_kernel = _building_gluon(lib.get_or_create_triton_kernel,
                                                      lib.triton_kernel_call_lib)
    return jax_triton


_FFI_TARGET = "triton_kernel_call_ffi"


def _kernel_call_registrations(kernel_call_lib) -> dict:
    """The XLA custom-call targets jaxlib's CUDA Triton library registers, by name."""
    plugin = getattr(kernel_call_lib, "_cuda_triton", None)
    return plugin.registrations() if hasattr(plugin, "registrations") else {}


def _as_typed_ffi_call(lowering):
    """A jax-triton lowering rule whose custom call is jaxlib's typed-FFI Triton call.

    jax-triton 0.3.1 emits jaxlib's legacy custom call `triton_kernel_call`, the zlib'd kernel
    call as the op's backend_config string. XLA cannot record a legacy custom call into a
    command buffer (a CUDA graph), so every launch costs host time at every execution: 3.4-6 us
    a launch of a one-line kernel on H200s, as much as the GPU time of most decode-step kernels
    (1.9 us through the typed-FFI call).
    jaxlib (0.10.1 on) also registers the same kernel call as a typed XLA FFI handler,
    `triton_kernel_call_ffi`, which takes the same bytes as its `opaque` attribute and which XLA
    may record into command buffers (jax-triton 0.4 emits it, but needs triton 3.7). The op is
    rewritten in place into what `jax.ffi.ffi_lowering` emits for that call: same operands,
    results, layouts and aliases.
    """
    from jax._src.lib.mlir import ir

    def lower(ctx, *args, **params):
        results = lowering(ctx, *args, **params)
        op = results[0].owner
        attributes = getattr(op, "operation", op).attributes
        opaque = attributes["backend_config"]
        attributes["call_target_name"] = ir.StringAttr.get(_FFI_TARGET)
        # A dictionary in mhlo.backend_config, with api_version 1, is how a typed-FFI call's
        # attributes travel (jax's mlir.custom_call); XLA then calls the handler with them.
        attributes["api_version"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 1)
        attributes["backend_config"] = ir.StringAttr.get("")
        attributes["mhlo.backend_config"] = ir.DictAttr.get({"opaque": opaque})
        return results

    return lower


class _KernelCallLib:
    """jaxlib's Triton kernel-call library, whose kernels leave their Triton IR out of the call.

    jaxlib finds a launch's kernel by hashing the whole serialized call (the kernel's PTX and
    Triton IR, zlib-compressed) on the host, at every launch. Measured on the H200 through
    jax-triton 0.3.1: 5.95 us of host time per launch of a one-line kernel, plus ~0.2-0.25 us
    per compressed KB (26 us at 98 KB, 193 us at 771 KB). The IR is not needed to run the kernel
    (it is kept for serialisation only), and the PTX is built without line information
    (`_without_line_info`): a decode step's kernels shrink from 5-15 KB to 3-8 KB compressed.
    """

    def __init__(self, lib):
        self._lib = lib

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def TritonKernel(self, name, num_warps, num_ctas, shared_mem_bytes, ptx, ttir, capability):
        del ttir
        return self._lib.TritonKernel(name, num_warps, num_ctas, shared_mem_bytes, ptx, "",
                                      capability)


@contextlib.contextmanager
def _without_line_info():
    """Triton builds kernels without source line information within the block (smaller PTX:
    see _KernelCallLib), unless TRITON_DISABLE_LINE_INFO is set: then as it says."""
    import triton
    compilation = triton.knobs.compilation
    with compilation.scope():  # puts the knobs and their environment variables back after
        if "TRITON_DISABLE_LINE_INFO" not in os.environ:
            compilation.disable_line_info = True
        yield


def _building_gluon(get_or_create_triton_kernel, kernel_call_lib):
    """jax-triton's kernel builder, extended to Gluon kernels (`triton.experimental.gluon.jit`).

    jax-triton 0.3.1 compiles every kernel from Triton IR (make_ttir, then make_ttgir); a Gluon
    kernel is written at the next level down and needs Triton's own pipeline for it. Here it is
    built by `triton.compile` and handed to jaxlib as the same kernel object (PTX, name, warps,
    shared memory), so jax-triton's custom call runs it like any other. The warp count is the
    compiled one: warp_specialize adds warps beyond the `num_warps` of the call.
    """
    built = {}

    @functools.wraps(get_or_create_triton_kernel)
    def build(backend_init_func, platform, fn, arg_dtypes, scalar_args, *, num_warps, num_stages,
              num_ctas, compute_capability, enable_fp_fusion, metaparams, dump):
        if not fn.is_gluon():
            with _without_line_info():
                return get_or_create_triton_kernel(
                    backend_init_func, platform, fn, arg_dtypes, scalar_args,
                    num_warps=num_warps, num_stages=num_stages, num_ctas=num_ctas,
                    compute_capability=compute_capability, enable_fp_fusion=enable_fp_fusion,
                    metaparams=metaparams, dump=dump)
        if scalar_args:
            raise ValueError(f"{fn.__name__}: jtgpt passes Gluon kernels arrays and constexprs "
                             f"only, got scalar arguments {scalar_args}")
        if compute_capability is None:  # jax-triton's default: device 0's
            compute_capability = kernel_call_lib.get_compute_capability(0)
        signature = dict(zip(fn.arg_names, arg_dtypes))
        key = (fn, tuple(signature.items()), tuple(metaparams.items()), num_warps, num_ctas,
               compute_capability)
        if key not in built:
            with _without_line_info():
                compiled, attrs = _compile_gluon(fn, signature, dict(metaparams), num_warps,
                                                 compute_capability, num_ctas=num_ctas)
            meta = compiled.metadata
            built[key] = kernel_call_lib.TritonKernel(
                meta.name, meta.num_warps, num_ctas, meta.shared, compiled.asm["ptx"], "",
                compute_capability), attrs
        return built[key]

    return build


def _compile_gluon(fn, signature, constexprs, num_warps, capability, **options):
    """(Triton's CompiledKernel, the argument attributes) of a Gluon kernel for an NVIDIA GPU of
    compute capability `capability`; array arguments are taken to be 16-byte aligned, as
    jax-triton takes them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values())
             if ty.startswith("*")}
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(GluonASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, **options))
    return compiled, attrs


# ------------------------------------------------------------------------------- compile only

@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """One kernel built by compile_only(), with ptxas's resource use per thread / program."""
    name: str
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # the stack frame: registers spilled to local memory
    shared_bytes: int


_compile_log: dict[tuple, CompiledKernel] | None = None  # one entry per distinct build
_compile_capability = 90


@contextlib.contextmanager
def compile_only(capability: int = 90):
    """Within the block, triton_call builds each kernel for compute capability `capability`
    (90: H100/H200) and returns zeros instead of running it; yields the CompiledKernels built,
    one per distinct kernel, argument types and constexprs.

    Arguments are typed as jax-triton types them (pointers 16-byte aligned, constexprs baked in),
    so what compiles here compiles there. Use it with jax.eval_shape: nothing needs to run.
    """
    global _compile_log, _compile_capability
    saved = _compile_log, _compile_capability
    _compile_log, _compile_capability = {}, capability
    try:
        yield _compile_log.values()
    finally:
        _compile_log, _compile_capability = saved


_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32",
                 "int64": "i64", "uint32": "u32", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _compile_call(args, kernel, out_shapes, num_warps, num_stages, constexprs):
    import jax.numpy as jnp

    signature, attrs = {}, {}
    for i, (name, arg) in enumerate(zip(kernel.arg_names, (*args, *out_shapes))):
        if hasattr(arg, "dtype"):
            signature[name] = "*" + _TRITON_TYPES[np.dtype(arg.dtype).name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if isinstance(arg, float) else "i32"
    signature.update({name: "constexpr" for name in constexprs})
    key = (kernel.fn, tuple(signature.items()), tuple(constexprs.items()), num_warps, num_stages)
    if key not in _compile_log:
        _compile_log[key] = _build(kernel, signature, constexprs, attrs, num_warps, num_stages)
    return tuple(jnp.zeros(s.shape, s.dtype) for s in out_shapes)


def _build(kernel, signature, constexprs, attrs, num_warps, num_stages) -> CompiledKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernel.is_gluon():
        arrays = {name: ty for name, ty in signature.items() if ty != "constexpr"}
        compiled, _ = _compile_gluon(kernel, arrays, constexprs, num_warps, _compile_capability)
    else:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", _compile_capability, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    registers, stack = _resource_usage(compiled.asm["cubin"])
    return CompiledKernel(kernel.fn.__name__, dict(constexprs), compiled.metadata.num_warps,
                          num_stages, registers, stack, compiled.metadata.shared)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of a cubin, read by the cuobjdump that ships with Triton."""
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    return int(re.search(r"REG:(\d+)", report)[1]), int(re.search(r"STACK:(\d+)", report)[1])


# ----------------------------------------------------------------------------------------- CPU

# Triton's interpreter patches triton.language's functions while a kernel runs and restores them
# after, so two threads interpreting at once (a server's engine thread and a caller) break each
# other with "Did you forget to add @triton.jit ?". One kernel at a time, process-wide.
_INTERPRETER_LOCK = threading.Lock()


def _cpu_call(args, kernel, out_shapes, grid, num_warps, num_stages, aliases, constexprs):
    is_array = [hasattr(a, "shape") and hasattr(a, "dtype") for a in args]
    arrays = [a for a, arr in zip(args, is_array) if arr]

    def host(*host_arrays):
        torch = _torch()
        it = iter(host_arrays)
        kernel_args = [_to_torch(np.asarray(next(it))) if arr else a for a, arr in zip(args, is_array)]
        outs = [_poisoned(torch, s) for s in out_shapes]
        for i, o in aliases.items():
            outs[o] = kernel_args[i]  # in place: the kernel gets the input's buffer twice
        with _INTERPRETER_LOCK:
            _interpreted(kernel)[grid](*kernel_args, *outs, num_warps=num_warps,
                                       num_stages=num_stages, **constexprs)
        return tuple(_to_numpy(o, s.dtype) for o, s in zip(outs, out_shapes))

    return jax.pure_callback(host, tuple(out_shapes), *arrays, vmap_method="sequential")


@functools.cache
def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - the install extras bring it
        raise ImportError(
            "jtgpt runs its Triton kernels on CPU through Triton's interpreter, which needs "
            "torch (CPU build): pip install 'jtgpt[cpu]' or pip install torch==2.13.0") from e
    _shim_interpreter()
    return torch


def _interpreted(kernel):
    return _interpreted_fn(kernel.fn)  # keyed by the Python function: hashing a JITFunction parses it


@functools.cache
def _interpreted_fn(fn):
    from triton.runtime.interpreter import InterpretedFunction
    return InterpretedFunction(fn)


def _to_torch(a: np.ndarray):
    torch = _torch()
    a = np.array(a, copy=True, order="C")  # callback inputs may be read-only views
    if a.dtype == jax.numpy.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _to_numpy(t, dtype) -> np.ndarray:
    torch = _torch()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jax.numpy.bfloat16)
    return t.numpy().astype(dtype, copy=False)


def _poisoned(torch, shape: ShapeDtype):
    dtype = np.dtype(shape.dtype)
    if dtype == jax.numpy.bfloat16:
        return torch.full(shape.shape, float("nan"), dtype=torch.bfloat16)
    t = torch.from_numpy(np.empty(shape.shape, dtype))
    if np.issubdtype(dtype, np.floating):
        t.fill_(float("nan"))
    elif np.issubdtype(dtype, np.integer):
        t.fill_(np.iinfo(dtype).min)
    return t


@functools.cache
def _shim_interpreter() -> None:
    """Make Triton 3.6's interpreter run our kernels as the GPU does (the CPU path only).

    - Without TRITON_INTERPRET set, the @triton.jit helpers a kernel calls (tl.cdiv, tl.sigmoid,
      our own) stay compiled-only JITFunctions that refuse to be called: interpret them too.
    - The interpreter keeps bf16 values as their raw uint16 bits. `tl.dot` on bf16 operands then
      multiplies the bits as integers, and fp32 -> bf16 casts truncate the mantissa instead of
      rounding to nearest even. Both go through ml_dtypes' bfloat16 instead (what JAX uses).
    """
    import ml_dtypes
    import triton.language as tl
    from triton.runtime import interpreter as interp
    from triton.runtime.jit import JITFunction

    def call_helper(self, *args, **kwargs):
        # InterpretedFunction.__call__ would patch triton.language for the helper and never undo
        # it, which breaks any later real compile in this process (compile_only, or a GPU).
        scope = interp._patch_lang(self.fn)
        try:
            return _interpreted(self).rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    JITFunction.__call__ = call_helper

    builder = interp.InterpreterBuilder

    def as_f32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return handle.data.view(ml_dtypes.bfloat16).astype(np.float32)
        return handle.data

    original_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            out = np.matmul(as_f32(a), as_f32(b), dtype=np.float32).astype(d.data.dtype) + d.data
            return interp.TensorHandle(out, d.dtype.scalar)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if dst_ty == tl.bfloat16 and src_ty.is_floating():
            data = as_f32(src).astype(ml_dtypes.bfloat16).view(np.uint16)
            return interp.TensorHandle(data, dst_ty)
        if src_ty == tl.bfloat16 and dst_ty.is_floating():
            return interp.TensorHandle(as_f32(src).astype(interp._get_np_dtype(dst_type)), dst_ty)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    for name in ("create_fp_ext", "create_fp_trunc"):
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    builder.create_fp_to_fp = lambda self, src, dst_type, rounding_mode: self.cast_impl(src, dst_type)
