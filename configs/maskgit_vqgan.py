"""The MaskGIT-VQGAN (proxy-code teacher / pixel decoder):
``configs/maskgit_vqgan.py:size=maskgit``.

Arguments:
  size: maskgit (the released ImageNet f16 model) | tiny (CPU-sized, for tests).
"""
import ml_collections

from titok_jax.infra.config import parse_arg
from titok_jax.models import variants


def get_config(arg: str | None = None):
    a = parse_arg(arg, size="maskgit", runlocal=False)
    config = ml_collections.ConfigDict()
    config.model = variants.vqgan_model_config("tiny" if a.runlocal else a.size)
    config.lock()
    return config
