"""titok-jax: JAX/Flax 1D image tokenizers (TiTok, ALIT, MaskGIT-VQGAN), with official-weight
parity."""
import os

# gs:// paths (etils.epath) go through fsspec/gcsfs, the backend the tests run against a GCS
# emulator, rather than tf.io.gfile (whose GCS endpoints cannot be redirected). Set
# EPATH_USE_TF=1 before importing titok_jax to choose TensorFlow's client instead.
os.environ.setdefault("EPATH_USE_TF", "0")

from titok_jax.convert.layout import CheckpointMismatchError
from titok_jax.inference.alit import ALITTokenizer, load_alit
from titok_jax.inference.generator import load_generator
from titok_jax.inference.tokenizer import (
           VQGAN,
           Tokenizer,
           check_images,
           export_pytorch,
           load_tokenizer,
           load_vqgan,
)

__all__ = ["ALITTokenizer", "CheckpointMismatchError", "Tokenizer", "VQGAN", "check_images",
           "export_pytorch", "load_alit", "load_generator", "load_tokenizer", "load_vqgan"]
__version__ = "0.1.0"
