"""Every kernel of the GPT-2 124M forward builds for the H100 (sm_90), checked on any machine.

The interpreter runs what the GPU compiler rejects (a plain-float global, say), so CPU tests
alone cannot show that the kernels build. compile_only() builds them with Triton's own ptxas.
"""
import jax
import jax.numpy as jnp
import pytest

import jtgpt
from jtgpt.call import compile_only
from jtgpt.kernels.embedding import embedding
from jtgpt.models.gpt2 import GPTConfig

KERNELS = {"_embedding_fwd_kernel", "_layer_norm_fwd_kernel", "_matmul_kernel", "_attn_fwd_kernel"}


@pytest.mark.parametrize("dtype,precision", [(jnp.bfloat16, "ieee"), (jnp.float16, "ieee"),
                                             (jnp.float32, "tf32"), (jnp.float32, "ieee")])
@pytest.mark.parametrize("dropout", [False, True])
def test_gpt2_forward_builds_for_hopper(dtype, precision, dropout):
    config = GPTConfig(attn_pdrop=0.0)
    model = jax.eval_shape(lambda: jtgpt.GPT(config, dtype=dtype, precision=precision))
    ids = jax.ShapeDtypeStruct((512, 300), jnp.int32)
    mask = jax.ShapeDtypeStruct((512, 300), jnp.int32)
    key = jax.random.key(0) if dropout else None
    # Interpret a kernel that calls @triton.jit helpers (tl.rand) first: the interpreter must leave
    # triton.language as it found it, or the real compile below fails.
    table = jnp.ones((5, 8), dtype)
    tokens = jnp.zeros((1, 3), jnp.int32)
    jax.block_until_ready(embedding(tokens, tokens, table, table, dropout_rate=0.5, seed=jnp.int32(1)))
    with compile_only(capability=90) as built:
        jax.eval_shape(lambda m, ids, mask: m(ids, mask, dropout_key=key), model, ids, mask)
    assert {k.name for k in built} == KERNELS
    for k in built:  # what ptxas accepted must also fit an H100 multiprocessor
        assert 0 < k.registers <= 255 and k.shared_bytes <= 227 * 1024, k
