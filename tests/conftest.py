"""Test setup: 8 forced CPU devices (set before jax is imported) and a persistent compile cache."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


class Fixture:
    """One official-code reference: arrays in official layouts plus the manifest."""

    def __init__(self, name: str):
        self.name = name
        self.dir = os.path.join(DATA, name)
        with open(os.path.join(self.dir, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.arrays = dict(np.load(os.path.join(self.dir, "reference.npz")))

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def tolerance(self, key: str) -> float:
        """max(1e-4, 4 x the reference's own float32-vs-float64 error), per the fixtures README."""
        return max(1e-4, 4.0 * self.manifest["tensors"][key]["fp64_max_abs_err"])

    def weights(self) -> str:
        return os.path.join(self.dir, "weights.safetensors")

    @property
    def state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.manifest["state_dict"].items()}


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


def fixture_model_config(fx: Fixture):
    """The titok-jax ``config.model`` of a fixture, read from the manifest's build record."""
    from titok_jax import variants
    b = fx.manifest["build"]
    if fx.name.startswith("maskgit_vqgan"):
        return variants.vqgan_model_config("tiny")
    cfg = variants.titok_model_config("tiny")
    cfg.variant = fx.name
    cfg.encoder, cfg.decoder = b["encoder"]["size_key"], b["decoder"]["size_key"]
    cfg.num_latent_tokens, cfg.token_size = b["num_latent_tokens"], b["token_size"]
    cfg.quantize_mode = b["quantize_mode"]
    cfg.codebook_size = b.get("codebook_size", 0)
    cfg.use_l2_norm = b.get("use_l2_norm", False)
    cfg.commitment_cost = b.get("commitment_cost", 0.25)
    cfg.is_legacy, cfg.finetune_decoder = b["is_legacy"], b["finetune_decoder"]
    return cfg


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The embedded photo dataset prepared by the real TFDS imagenet2012 builder (~3 s)."""
    from titok_jax.data.embedded import prepare_embedded_imagenet
    return prepare_embedded_imagenet(str(tmp_path_factory.mktemp("tfds")))
