"""Triton kernels, one op family per module, and the argument checks they share."""
import jax.numpy as jnp

FLOAT_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.float16, jnp.bfloat16)))


def check_float_dtype(what: str, dtype) -> None:
    """ValueError naming `what` (e.g. "x dtype") unless dtype is float32, float16 or bfloat16."""
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32, float16 or bfloat16, got {jnp.dtype(dtype).name}")
