"""titok-jax: JAX/Flax 1D image tokenizers (TiTok, ALIT, MaskGIT-VQGAN), with official-weight
parity."""
from titok_jax.alit import ALITTokenizer, load_alit
from titok_jax.api import VQGAN, Tokenizer, check_images, export_pytorch, load_tokenizer, load_vqgan
from titok_jax.convert.layout import CheckpointMismatchError

__all__ = ["ALITTokenizer", "CheckpointMismatchError", "Tokenizer", "VQGAN", "check_images",
           "export_pytorch", "load_alit", "load_tokenizer", "load_vqgan"]
__version__ = "0.1.0"
