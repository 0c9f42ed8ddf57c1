"""jtgpt: GPT-2 and Llama in JAX/Flax with every heavy op a hand-written Triton kernel."""
import jax.numpy as jnp

from jtgpt import checkpoint
from jtgpt.models.gpt2 import GPT, GPTConfig
from jtgpt.models.gpt2 import PRESETS as _GPT2_PRESETS
from jtgpt.models.llama import Llama, LlamaConfig
from jtgpt.models.llama import PRESETS as _LLAMA_PRESETS

MODELS = {"gpt2": GPT, "llama": Llama}  # config.json's model_type -> the class that loads it
PRESETS = {**_GPT2_PRESETS, **_LLAMA_PRESETS}  # name -> GPTConfig or LlamaConfig


def from_pretrained(name_or_path, *, dtype=jnp.float32, param_dtype=None, precision="ieee",
                    revision=None, cache_dir=None, local_files_only=False, token=None):
    """A GPT or Llama from a Hugging Face checkpoint, the class picked by config.json's
    model_type. The arguments are those of GPT.from_pretrained / Llama.from_pretrained."""
    directory = checkpoint.resolve(name_or_path, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only, token=token)
    model_type = checkpoint.load_config(directory).get("model_type")
    if model_type not in MODELS:
        raise ValueError(f"{directory}: config.json has model_type {model_type!r}; jtgpt supports "
                         f"{', '.join(map(repr, MODELS))}")
    return MODELS[model_type].from_directory(directory, dtype=dtype, param_dtype=param_dtype,
                                             precision=precision)


__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "MODELS", "PRESETS", "from_pretrained"]
