"""jtgpt: GPT-2 in JAX/Flax with every heavy op a hand-written Triton kernel."""
from jtgpt.models.gpt2 import GPT, GPTConfig, PRESETS

__all__ = ["GPT", "GPTConfig", "PRESETS"]
