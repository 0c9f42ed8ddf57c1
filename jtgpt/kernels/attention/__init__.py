"""Attention kernels.

- flash.py: flash attention over whole sequences (training, prompts): Triton kernels for every
  case, forward and backward, and the entry points `flash_attention` / `attention_forward`;
- hopper.py: Gluon kernels (FlashAttention-3's schedule) that flash.py uses for its most common
  case on H100/H200;
- decode.py: flash-decoding, one new token per row against its KV cache (`decode_attention`),
  the keys split over several programs and their partial results merged;
- paged.py: a ragged batch's new tokens (decode, prefill and extend rows in one launch) against
  a paged KV cache read through block tables (`paged_attention`), for serving;
- common.py: what both share (the call's static configuration, the causal program order).
"""
from jtgpt.kernels.attention.decode import decode_attention
from jtgpt.kernels.attention.flash import attention_forward, flash_attention
from jtgpt.kernels.attention.paged import paged_attention

__all__ = ["attention_forward", "decode_attention", "flash_attention", "paged_attention"]
