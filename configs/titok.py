"""TiTok tokenizers: ``--config configs/titok.py:variant=L-32,stage=1,runlocal``.

Arguments:
  variant: L-32 | B-64 | S-128 (two-stage, legacy) | BL-64-VQ | BL-128-VQ | SL-256-VQ |
    LL-32-VAE | BL-64-VAE | BL-128-VAE (single-stage) | tiny (CPU-sized two-stage model).
  stage: 1 (proxy-code training, no pixel decoder) or 2 (decoder fine-tuning / the released
    tokenizer); only for the two-stage variants. Default: the released configuration.
  runlocal: shrink to a CPU-sized run (the ``tiny`` model, small batch).
"""
import ml_collections

from titok_jax import variants
from titok_jax.config_arg import parse_arg


def get_config(arg: str | None = None):
    a = parse_arg(arg, variant="L-32", stage=0, runlocal=False)
    variant = "tiny" if a.runlocal else a.variant
    config = ml_collections.ConfigDict()
    config.model = variants.titok_model_config(variant, stage=a.stage or None)
    config.lock()  # an override of an unknown key raises instead of adding it
    return config
