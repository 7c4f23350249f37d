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
    """A TFDS data dir holding the embedded photo dataset (``DATASET_NAME``, default settings),
    prepared offline (~1 s)."""
    from titok_jax.data.embedded import prepare_embedded
    return prepare_embedded(str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS emulator for ``gs://`` tests: fake-gcs-server on 127.0.0.1 (a free port, in
    memory) with the bucket ``helpers.GCS_BUCKET``, started once per session and stopped at its
    end. Yields a ``helpers.GcsEmulator``: ``.path("a", "b")`` / ``.new_dir()`` give
    ``gs://titok-test/...`` paths, ``.objects(prefix)`` lists what the emulator holds,
    ``.env()`` is the environment for subprocesses (``env={**os.environ, **emulator.env()}``).

    No Google credentials are used. How each storage layer reaches the emulator (set here in
    ``os.environ`` for the whole session, after the first test that asks for this fixture):

    * ``etils.epath`` (titok-jax paths, TFDS, Orbax's directory handling): with TensorFlow
      installed epath would use ``tf.io.gfile``, whose GCS client has its endpoints compiled
      in (no emulator setting), so ``EPATH_USE_TF=0`` makes epath use fsspec/gcsfs, which
      reads ``STORAGE_EMULATOR_HOST``; ``FSSPEC_GS_TOKEN=anon`` gives anonymous credentials and
      ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` skips gcsfs's Storage Control gRPC lookup.
      epath caches its backend choice, so the cache is cleared here.
    * tensorstore (Orbax array data): ``TENSORSTORE_GCS_HTTP_URL`` replaces
      storage.googleapis.com; ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` is a fixed token, so no
      credential search.
    * TFDS: metadata (``dataset_info.json``, ``features.json``) goes through epath; records of
      array_record data sources through array_record's own GCS client (google-cloud-cpp), which
      reads ``CLOUD_STORAGE_EMULATOR_ENDPOINT``.
    * ``tf.io.gfile`` itself cannot reach the emulator (it resolves www.googleapis.com); nothing
      of titok-jax should call it on gs:// paths.
    """
    import fsspec.config
    from etils.epath import gpath

    from helpers import GcsEmulator

    with GcsEmulator() as emulator, pytest.MonkeyPatch.context() as mp:
        for key, value in emulator.env().items():
            mp.setenv(key, value)
        # fsspec read FSSPEC_* into its config when it was imported, maybe before this fixture.
        mp.setitem(fsspec.config.conf, "gs", {**fsspec.config.conf.get("gs", {}),
                                              "token": "anon"})
        gpath._is_tf_installed.cache_clear()
        yield emulator
    gpath._is_tf_installed.cache_clear()
