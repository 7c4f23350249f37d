"""Class-conditional samples of a MaskGIT generator, decoded by its TiTok tokenizer and written as
an ADM evaluator batch (``titok-jax sample``), for gFID / IS with ``titok-jax fid``::

    titok-jax sample --generator titok_l32 --generator-weights generator_titok_l32.bin \
        --tokenizer titok_l32 --tokenizer-weights tokenizer_titok_l32.bin --out samples.npz
    titok-jax fid samples.npz VIRTUAL_imagenet256_labeled.npz --inception-fc pt_inception.pth

The official protocol (``sample_imagenet_titok.py``): sample ``i`` has class ``i % num_classes``
(50 per class for 50k samples of 1000 classes); an image is ``clamp(decode_tokens(ids), 0, 1)``
cast as ``(x * 255).to(torch.uint8)`` does, which truncates toward zero (no rounding). Sampling,
decoding, clamp and cast run as one jitted program with the batch sharded over the local devices.

Determinism: samples are drawn in chunks of ``chunk_size`` (the global batch); chunk ``c`` uses
the key ``fold_in(PRNGKey(seed), c)`` and is drawn by host ``c % num_hosts``, so a seed gives
the same images whatever the number of hosts or devices (the last chunk is drawn whole and cut).

Resuming: each finished chunk lands atomically in ``<out>.parts/chunk_<c>.npy`` next to
``run.json``, the record of the run (models, weights, settings, seed, sizes). A rerun refuses
any difference from that record and draws only the missing chunks. Then process 0 streams the
chunks into ``<out>``: ``arr_0`` uint8 ``[N, H, W, 3]`` and ``arr_1`` int64 labels ``[N]``,
written under a temporary name and renamed. The parts folder is kept: it is the run's own
output (and lets a lost ``<out>`` be rebuilt); delete it once the ``.npz`` is checked.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import sys
import time
import zipfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from titok_jax.inference import sampling
from titok_jax.infra import sharding
from titok_jax.infra.checkpointing import config_differences
from titok_jax.infra.distributed import barrier
from titok_jax.infra.paths import as_path, write_atomic

RUN_FILE = "run.json"
NUM_GRID_IMAGES = 64


def check_compatible(generator, tokenizer) -> None:
    """Raises ValueError unless ``generator`` samples ids that ``tokenizer`` decodes to pixels."""
    gen = f"the generator ({generator.config.get('variant', '?')})"
    tok = f"the tokenizer ({tokenizer.config.get('variant', '?')})"
    if tokenizer.is_vae:
        raise ValueError(f"{tok} is a VAE (continuous latents); a MaskGIT generator needs a VQ "
                         f"tokenizer")
    if tokenizer.module.outputs_proxy_codes:
        raise ValueError(f"{tok} is a stage-1 model (it predicts MaskGIT-VQGAN codes); sampling "
                         f"needs a two-stage tokenizer that decodes to pixels")
    for what, g, t in (("codebook size", generator.codebook_size, tokenizer.config.codebook_size),
                       ("token count", generator.num_tokens, tokenizer.num_tokens)):
        if g != t:
            raise ValueError(f"{gen} and {tok} do not match: {what} {g} vs {t}")


def to_uint8(images: jax.Array) -> jax.Array:
    """Images -> uint8 as the official ``clamp(x, 0, 1)`` then ``(x * 255).to(torch.uint8)``:
    a float -> uint8 cast truncates toward zero, in XLA as in PyTorch."""
    return (jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


class Sampler:
    """Class labels ``[B]`` and a key -> uint8 images ``[B, H, W, 3]``: one jitted program
    (MaskGIT sampling, ``decode_tokens``, clamp, uint8) with the batch sharded over ``devices``
    (default: this host's). ``settings`` default to the generator's ``sampling_defaults``."""

    def __init__(self, generator, tokenizer, settings: sampling.SamplingConfig | None = None,
                 devices: Sequence[jax.Device] | None = None):
        check_compatible(generator, tokenizer)
        self.generator, self.tokenizer = generator, tokenizer
        self.settings = (settings or generator.sampling_defaults).validate()
        self.mesh = sharding.make_mesh(jax.local_devices() if devices is None else devices)
        replicated, batch = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
        sample_ids = generator.sample_fn(self.settings)
        decoder = tokenizer.module

        def images(gen_params, tok_params, labels, key):
            ids = sample_ids(gen_params, labels, key)
            return to_uint8(decoder.apply({"params": tok_params}, ids,
                                          method=decoder.decode_tokens))
        self.fn = jax.jit(images, in_shardings=(replicated, replicated, batch, replicated),
                          out_shardings=batch)
        self._params = jax.device_put((generator.params, tokenizer.params), replicated)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.tokenizer.image_size, self.tokenizer.image_size, 3)

    def __call__(self, labels: np.ndarray, key: jax.Array) -> np.ndarray:
        labels = np.asarray(labels, np.int32)
        if labels.shape[0] % self.mesh.size:
            raise ValueError(f"the batch ({labels.shape[0]}) must be a multiple of the device "
                             f"count ({self.mesh.size})")
        # Placed explicitly: with several processes jit takes no sharded numpy input.
        labels = jax.device_put(labels, sharding.batch_sharding(self.mesh))
        return np.asarray(self.fn(*self._params, labels, key))


def sample_labels(start: int, stop: int, num_classes: int) -> np.ndarray:
    """The classes of samples ``start..stop-1``: ``i % num_classes``."""
    return np.arange(start, stop, dtype=np.int64) % num_classes


def chunk_key(seed: int, chunk: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), chunk)


def parts_dir(out: str | os.PathLike) -> epath.Path:
    out = as_path(out)
    return out.with_name(out.name + ".parts")


def _chunk_path(parts: epath.Path, chunk: int) -> epath.Path:
    return parts / f"chunk_{chunk:06d}.npy"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _read_chunk(parts: epath.Path, chunk: int, shape: tuple[int, ...]) -> np.ndarray:
    path = _chunk_path(parts, chunk)
    try:
        array = np.load(io.BytesIO(path.read_bytes()))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete it to draw that chunk again") \
            from e
    if array.shape != shape or array.dtype != np.uint8:
        raise ValueError(f"{path} holds {array.dtype} {array.shape}, expected uint8 {shape}; "
                         f"delete it to draw that chunk again")
    return array


def _check_outputs(out: epath.Path, parts: epath.Path, record: dict,
                   chunk_names: list[str]) -> bool:
    """Raises unless ``out`` and ``parts`` are absent or this same run's (read only, so every
    host reaches the same verdict); True when the run starts afresh."""
    run_file = parts / RUN_FILE
    if not run_file.exists():
        if out.exists():
            raise ValueError(f"{out} exists and {run_file} does not: not overwriting a file "
                             f"this run did not write")
        if parts.exists() and any(parts.iterdir()):
            raise ValueError(f"{parts} exists and holds files but no {RUN_FILE}: not a sample "
                             f"run's folder; use another --out")
        return True
    differences = config_differences(json.loads(run_file.read_text()), record)
    if differences:
        raise ValueError(f"{parts} holds samples of a different run; use another --out, or "
                         f"the same settings to resume it. Differences (stored -> now):\n  "
                         + "\n  ".join(differences))
    if out.exists():
        existing = {p.name for p in parts.iterdir()}
        missing = [name for name in chunk_names if name not in existing]
        if missing:
            raise ValueError(f"{out} exists but {missing[:5]} of its run are missing from "
                             f"{parts}; not overwriting it")
    return False


def _write_npz(f, parts: epath.Path, num_samples: int, num_classes: int, chunk_size: int,
               image_shape: tuple[int, ...]) -> None:
    """The ADM batch, streamed chunk by chunk: one chunk of images in memory at a time."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num_samples,) + tuple(image_shape)}
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as entry:
            np.lib.format.write_array_header_1_0(entry, header)
            for c, start in enumerate(range(0, num_samples, chunk_size)):
                n = min(chunk_size, num_samples - start)
                entry.write(_read_chunk(parts, c, (n,) + tuple(image_shape)).tobytes())
        with zf.open("arr_1.npy", "w") as entry:
            np.lib.format.write_array(entry, sample_labels(0, num_samples, num_classes))


def verify_npz(path: str | os.PathLike, num_samples: int, num_classes: int,
               image_shape: tuple[int, ...]) -> None:
    """Checks with ``np.load`` that ``path`` is the ADM batch of a run (the image array's
    header and the labels; the images are not read)."""
    with as_path(path).open("rb") as f, np.load(f) as npz:
        if sorted(npz.files) != ["arr_0", "arr_1"]:
            raise ValueError(f"{path}: expected arrays arr_0, arr_1, found {npz.files}")
        with npz.zip.open("arr_0.npy") as entry:
            major, _ = np.lib.format.read_magic(entry)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(entry)
        want = (num_samples,) + tuple(image_shape)
        if shape != want or dtype != np.uint8:
            raise ValueError(f"{path}: arr_0 is {dtype} {shape}, expected uint8 {want}")
        if not np.array_equal(npz["arr_1"], sample_labels(0, num_samples, num_classes)):
            raise ValueError(f"{path}: arr_1 does not hold the labels i % {num_classes}")


def _assemble(out: epath.Path, parts: epath.Path, num_samples: int, num_classes: int,
              chunk_size: int, image_shape: tuple[int, ...]) -> None:
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            _write_npz(f, parts, num_samples, num_classes, chunk_size, image_shape)
        verify_npz(tmp, num_samples, num_classes, image_shape)
        tmp.rename(out)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def _write_grid(path: str | os.PathLike, parts: epath.Path, num_samples: int, chunk_size: int,
                image_shape: tuple[int, ...]) -> None:
    from titok_jax.data.images import image_grid, save_png
    count = min(NUM_GRID_IMAGES, num_samples)
    images = [_read_chunk(parts, c, (min(chunk_size, num_samples - c * chunk_size),)
                          + tuple(image_shape))
              for c in range(-(-count // chunk_size))]
    save_png(image_grid(np.concatenate(images)[:count]), path)


def _draw(sampler: Sampler, parts: epath.Path, chunks: list[int], bar, *, num_samples: int,
          chunk_size: int, num_classes: int, seed: int) -> None:
    """Draws ``chunks`` in order; a thread writes each one while the next is sampled (all
    submitted writes finish even when sampling fails, so a resume keeps them)."""
    drawn, started, written = 0, time.perf_counter(), None

    def write(c, images):
        write_atomic(_chunk_path(parts, c), _npy_bytes(images))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        for c in chunks:
            start = c * chunk_size
            n = min(chunk_size, num_samples - start)
            images = sampler(sample_labels(start, start + chunk_size, num_classes),
                             chunk_key(seed, c))
            if written is not None:
                written.result()  # raises a failed write here
            written = writer.submit(write, c, images[:n])
            drawn += n
            bar.set_postfix(samples_per_s=f"{drawn / (time.perf_counter() - started):.1f}",
                            refresh=False)
            bar.update(1)
        if written is not None:
            written.result()


def _run_record(sampler: Sampler, sources: dict[str, dict], **sizes: int) -> dict:
    """What ``run.json`` records (and a rerun must match), as JSON values."""
    return json.loads(json.dumps(dict(
        **sizes, image_shape=list(sampler.image_shape),
        settings=dataclasses.asdict(sampler.settings),
        generator=dict(config=sampler.generator.config.to_dict(), **sources.get("generator", {})),
        tokenizer=dict(config=sampler.tokenizer.config.to_dict(),
                       **sources.get("tokenizer", {})))))


def write_samples(sampler: Sampler, out: str | os.PathLike, *, num_samples: int = 50_000,
                  chunk_size: int, seed: int = 42, num_classes: int | None = None,
                  sources: dict[str, dict] | None = None, grid: str | os.PathLike | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Draws ``num_samples`` samples into the ADM ``.npz`` ``out`` (local or ``gs://``),
    resumably (see the module docstring); returns a summary.

    Args:
      chunk_size: samples per chunk (the global batch); a multiple of ``sampler``'s devices.
      num_classes: sample ``i`` has class ``i % num_classes``; default the generator's.
      sources: extra provenance for ``run.json``, ``{"generator": {...}, "tokenizer": {...}}``
        (names, weights paths); a rerun must match it.
      grid: also write a PNG grid of the first 64 samples there.
      process_index, process_count: this host and the number of hosts (default JAX's); host
        ``h`` draws the chunks ``c`` with ``c % process_count == h``, process 0 assembles. With
        several hosts ``out`` must be on storage they share (``gs://``, a shared filesystem).
    """
    gen = sampler.generator
    num_classes = gen.num_classes if num_classes is None else num_classes
    if not 1 <= num_classes <= gen.num_classes:
        raise ValueError(f"num_classes must lie in [1, {gen.num_classes}] (the generator's "
                         f"classes), got {num_classes}")
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples and the batch size must be positive, got {num_samples} "
                         f"and {chunk_size}")
    if chunk_size % sampler.mesh.size:
        raise ValueError(f"the batch size ({chunk_size}, global) must be a multiple of the "
                         f"local device count ({sampler.mesh.size})")
    out = as_path(out)
    if not out.name.endswith(".npz"):
        raise ValueError(f"the output must be an .npz file (ADM layout), got {out}")
    index = jax.process_index() if process_index is None else process_index
    hosts = jax.process_count() if process_count is None else process_count
    if not 0 <= index < hosts:
        raise ValueError(f"process_index must lie in [0, {hosts}), got {index}")
    record = _run_record(sampler, sources or {}, num_samples=num_samples,
                         num_classes=num_classes, chunk_size=chunk_size, seed=seed)
    parts = parts_dir(out)
    num_chunks = -(-num_samples // chunk_size)
    names = [_chunk_path(parts, c).name for c in range(num_chunks)]
    fresh = _check_outputs(out, parts, record, names)
    barrier("titok_sample_checked")  # nothing is written before every host has checked
    if fresh and index == 0:
        parts.mkdir(parents=True, exist_ok=True)
        write_atomic(parts / RUN_FILE, json.dumps(record, indent=1, sort_keys=True).encode())
    barrier("titok_sample_started")

    existing = {p.name for p in parts.iterdir()}
    mine = list(range(index, num_chunks, hosts))
    todo = [c for c in mine if names[c] not in existing]
    from tqdm import tqdm
    with tqdm(total=len(mine), initial=len(mine) - len(todo), unit="chunk", file=sys.stderr,
              desc=f"sampling (host {index}/{hosts})" if hosts > 1 else "sampling",
              disable=not progress or index != 0) as bar:
        _draw(sampler, parts, todo, bar, num_samples=num_samples, chunk_size=chunk_size,
              num_classes=num_classes, seed=seed)

    barrier("titok_sample_drawn")
    summary = dict(out=os.fspath(out), parts=os.fspath(parts), num_samples=num_samples,
                   chunks_drawn=len(todo), assembled=False)
    if index != 0:
        return summary
    existing = {p.name for p in parts.iterdir()}
    missing = [c for c in range(num_chunks) if names[c] not in existing]
    if missing:
        raise ValueError(f"chunks {missing[:10]} of {num_chunks} are not in {parts} yet (drawn "
                         f"by other hosts); rerun when they finish to assemble {out}")
    if out.exists():
        verify_npz(out, num_samples, num_classes, sampler.image_shape)
    else:
        _assemble(out, parts, num_samples, num_classes, chunk_size, sampler.image_shape)
        summary["assembled"] = True
    if grid:
        _write_grid(grid, parts, num_samples, chunk_size, sampler.image_shape)
    return summary


# ---------------------------------------------------------------------------------------------
# ``titok-jax sample``
