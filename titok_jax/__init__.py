"""titok-jax: JAX/Flax 1D image tokenizers (TiTok, MaskGIT-VQGAN), with official-weight parity."""
from titok_jax.api import (VQGAN, Tokenizer, check_images, export_pytorch, load_tokenizer,
                           load_vqgan)
from titok_jax.convert.layout import CheckpointMismatchError

__all__ = ["CheckpointMismatchError", "Tokenizer", "VQGAN", "check_images", "export_pytorch",
           "load_tokenizer", "load_vqgan"]
__version__ = "0.1.0"
