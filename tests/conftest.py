"""Test setup: 8 forced CPU devices (set before jax is imported) and a persistent compile cache."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import DATA, Fixture  # noqa: E402


@pytest.fixture(scope="session")
def inputs() -> np.ndarray:
    """The shared fixture batch, NHWC float32 in [0, 1] (every value is exactly k/255)."""
    u8 = np.load(os.path.join(DATA, "inputs_b2_uint8.npy"))
    return (u8.astype(np.float32) / np.float32(255)).transpose(0, 2, 3, 1)


@pytest.fixture(scope="session")
def fixture():
    cache = {}

    def get(name: str) -> Fixture:
        if name not in cache:
            cache[name] = Fixture(name)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The embedded photo dataset prepared by the real TFDS imagenet2012 builder (~3 s)."""
    from titok_jax.data.embedded import prepare_embedded_imagenet
    return prepare_embedded_imagenet(str(tmp_path_factory.mktemp("tfds")))
