"""ALIT adaptive-length tokenization: the public API.

    alit = titok_jax.load_alit("alit_small", "alit_small_in1k.pth")
    out = alit.encode_all(images)                  # 8 iterations: codes [B, 32 (k+1)] + recon
    ids, lengths = alit.encode_adaptive(images, threshold=0.07)   # per-image token counts
    images = alit.decode(ids, lengths)

Every iteration runs as its own jitted function (the stream grows by ``tokens_per_iter`` per
iteration), so adaptive encoding stops as soon as every image of the batch has its length and
never decodes pixels for an iteration that cannot be chosen.

Halting of 2D tokens (the official model hides well-reconstructed grid tokens from the next
pass): pass ``masks`` (bool ``[iters, B, g*g]``) to inject them, ``rng`` for the official
Bernoulli rule, or neither for the deterministic rule ``p_gt >= halting_threshold``.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from titok_jax.convert import native
from titok_jax.inference import weights
from titok_jax.inference.tokenizer import check_images
from titok_jax.models import variants


def load_alit(name: str, path: str | os.PathLike, *, which: str = "ema",
              model_config: ml_collections.ConfigDict | None = None,
              dtype: str | None = None) -> "ALITTokenizer":
    """Loads an ALIT tokenizer.

    Args:
      name: ``alit_tiny``, ``alit_small``, ``alit_base``, ``alit_semilarge`` (or a test size);
        ignored when ``path`` is a titok-jax folder.
      path: an official checkpoint (``.pth`` with ``model``/``ema`` dicts and an
        ``argparse.Namespace``; read with ``torch.load(weights_only=True)`` and that one class
        allow-listed), a flat ``.safetensors``/``.bin`` state dict with the official key names,
        or a titok-jax folder. The stage-2 ``gan_losses.*`` entries are dropped.
      which: ``ema`` (what the official evaluation uses) or ``model``.
    """
    source = weights.WeightsSource(path)
    stored = source.model_config()
    if stored is not None:
        cfg = ml_collections.ConfigDict((model_config or stored).to_dict())
        if cfg.name != "alit":
            raise ValueError(f"{path} holds a {cfg.name!r} model, not ALIT")
    else:
        cfg = ml_collections.ConfigDict((model_config or variants.alit_model_config(name))
                                        .to_dict())
    params = weights.load_params(cfg, source, which=which, what=f"ALIT ({path})", same_model=None)
    if dtype is not None:
        cfg.dtype = dtype
    return ALITTokenizer(cfg, params)


class ALITTokenizer:
    """An ALIT model bound to its parameters, with per-iteration jitted pieces."""

    def __init__(self, model_config: ml_collections.ConfigDict, params: dict):
        self.config = model_config
        self.module = m = variants.build_model(model_config)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.start_fn = jax.jit(functools.partial(m.apply, method=start_stream))
        self.pixels_fn = jax.jit(functools.partial(m.apply, method=m.decode_pixels))
        self._decode = jax.jit(functools.partial(m.apply, method=_decode_ids))
        self._decode_images = jax.jit(functools.partial(m.apply, method=decode_images))
        self.codes_fn = jax.jit(functools.partial(m.apply, method=stream_codes))
        self._iters: dict[tuple[int, str], Any] = {}

    # -- properties ---------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def tokens_per_iter(self) -> int:
        return self.config.tokens_per_iter

    @property
    def max_iters(self) -> int:
        return self.config.max_iters

    @property
    def max_tokens(self) -> int:
        return self.tokens_per_iter * self.max_iters

    def variables(self) -> dict:
        """The ``variables`` argument of the module and of the jitted pieces below."""
        return {"params": self.params}

    # The jitted pieces, each a function of (variables, ...): ``start_fn`` (images -> first
    # stream and the VQGAN's target ids), ``iteration_fn(k, halting)``, ``codes_fn`` (a stream's
    # codes without a decoder pass) and ``pixels_fn`` (decoder logits -> images).
    def iteration_fn(self, k: int, halting: str):
        key = (k, halting)
        if key not in self._iters:
            m = self.module
            fn = functools.partial(m.apply, method=stream_iteration, k=k, halting=halting,
                                   last=k + 1 == self.max_iters)
            self._iters[key] = jax.jit(fn)
        return self._iters[key]

    def _halting(self, masks, rng, num_iters: int, batch: int):
        if masks is not None:
            masks = np.asarray(masks)
            want = (num_iters, batch, self.module.grid_tokens)
            if masks.shape[0] < num_iters or masks.shape[1:] != want[1:]:
                raise ValueError(f"masks must be bool [{self.max_iters}, B, grid tokens] (at "
                                 f"least {want}), got {masks.shape}")
            return "inject", jnp.asarray(masks.astype(bool))
        return ("bernoulli" if rng is not None else "threshold"), None

    def _iterate(self, images, masks, rng, num_iters: int, codes_only_last: bool = False):
        """Yields (k, per-iteration device outputs) for k < num_iters. With
        ``codes_only_last`` the last iteration yields only ``{"codes"}``: its decoder pass only
        serves the halting of the next iteration, so a fixed-length encode skips it."""
        run = _Rollout(self, images, masks, rng, num_iters)
        for k in range(num_iters):
            yield k, run.step(k, codes_only=codes_only_last and k == num_iters - 1)

    def _num_iters(self, num_iters: int | None) -> int:
        n = self.max_iters if num_iters is None else int(num_iters)
        if not 1 <= n <= self.max_iters:
            raise ValueError(f"num_iters must be in [1, {self.max_iters}], got {num_iters}")
        return n

    # -- encoding -----------------------------------------------------------------------------

    def encode_all(self, images: Any, masks: Any = None, *, rng: jax.Array | None = None,
                   num_iters: int | None = None, with_recon: bool = True) -> list[dict]:
        """Runs the recurrence; entry k of the result holds iteration k's

        ``codes`` int32 ``[B, n (k+1)]``, ``latent_tokens`` ``[B, n (k+1), D]`` (the official
        ``encode()`` embedding), ``p_gt`` ``[B, g*g]``, ``halting_mask`` ``[B, g*g]``, and with
        ``with_recon`` ``recon`` ``[B, H, W, 3]`` (the VQGAN decoder output of the soft code,
        unclamped as in the official code) and ``l1`` ``[B]`` (per-image mean |recon - image|).
        """
        x = check_images(images, self.image_size)
        outs = []
        for k, out in self._iterate(x, masks, rng, self._num_iters(num_iters)):
            entry = {name: out[name] for name in ("codes", "latent_tokens", "p_gt",
                                                  "halting_mask")}
            if with_recon:
                entry["recon"] = self.pixels_fn(self.variables(), out["logits"])
                entry["l1"] = jnp.mean(jnp.abs(entry["recon"] - x), axis=(1, 2, 3))
            outs.append(entry)
        return outs

    def encode(self, images: Any, num_tokens: int, *, masks: Any = None,
               rng: jax.Array | None = None) -> jax.Array:
        """Fixed length: int32 codes ``[B, num_tokens]`` (a multiple of ``tokens_per_iter``)."""
        if num_tokens % self.tokens_per_iter or not 0 < num_tokens <= self.max_tokens:
            raise ValueError(f"num_tokens must be a multiple of {self.tokens_per_iter} in "
                             f"[{self.tokens_per_iter}, {self.max_tokens}], got {num_tokens}")
        iters = num_tokens // self.tokens_per_iter
        out = None
        for _, out in self._iterate(images, masks, rng, iters, codes_only_last=True):
            pass
        return out["codes"]

    def encode_adaptive(self, images: Any, threshold: float = 0.07, per_image: bool = True, *,
                        masks: Any = None, rng: jax.Array | None = None,
                        num_iters: int | None = None, return_info: bool = False):
        """Adaptive length by the paper's token-selection criterion (reconstruction L1).

        Per image (default): each image gets the first iteration whose own mean L1 is below
        ``threshold``, else its lowest-L1 iteration (earliest on ties). ``per_image=False`` is
        the official rule: one length for the batch, from the batch-mean L1.

        Iterations stop as soon as every image has its length, and finished images leave the
        batch (the stream is compacted to the next power-of-two row count), so neither their
        encoder/decoder passes nor their pixel decodes are computed again; the result does not
        depend on the compaction (Bernoulli halting draws are made per image). Returns
        ``(ids, lengths)``:
        int32 ``[B, max_tokens]`` padded with -1 after each image's length, and int32 ``[B]``;
        with ``return_info`` also a dict (``l1`` per iteration run ``[iters, B]``, NaN once an
        image has left the batch; ``iters_run``; ``batch_rows`` computed at each iteration;
        ``recon`` of the chosen lengths, unclamped).
        """
        x = check_images(images, self.image_size)
        b, n = x.shape[0], self.tokens_per_iter
        ids = np.full((b, self.max_tokens), -1, np.int32)
        chosen = np.full((b,), -1, np.int64)
        best_l1 = np.full((b,), np.inf)
        best_k = np.zeros((b,), np.int64)
        recon = np.zeros(x.shape, np.float32) if return_info else None
        l1_rows = []
        run = _Rollout(self, x, masks, rng, self._num_iters(num_iters))
        batch_rows = []
        for k in range(run.num_iters):
            batch_rows.append(len(run.rows))
            out = run.step(k)
            rows = run.rows[:run.num_real]  # the images of the batch rows, then padding
            rec = self.pixels_fn(self.variables(), out["logits"])
            l1_dev = jnp.mean(jnp.abs(rec - run.images), axis=(1, 2, 3))
            l1 = np.full((b,), np.nan)
            l1[rows] = np.asarray(l1_dev, np.float64)[:run.num_real]
            l1_rows.append(l1)
            score = l1 if per_image else np.full((b,), np.nanmean(l1))
            # An open image takes this iteration if it is its best so far (a strictly lower L1,
            # so ties keep the earliest); the first one under the threshold closes it (it is
            # necessarily its best, or the image would have closed before).
            take = np.zeros((b,), bool)
            take[rows] = score[rows] < best_l1[rows]
            where = np.nonzero(take[rows])[0]  # batch rows of the images that take it
            if len(where):
                ids[rows[where], :n * (k + 1)] = np.asarray(out["codes"])[where]
                ids[rows[where], n * (k + 1):] = -1
                if recon is not None:
                    recon[rows[where]] = np.asarray(rec)[where]
            best_k[take] = k
            best_l1[take] = score[take]
            closing = np.zeros((b,), bool)
            closing[rows] = score[rows] < threshold
            chosen[closing & (chosen < 0)] = k
            still_open = np.nonzero(chosen < 0)[0]
            if not len(still_open):
                break
            if per_image:  # drop finished images from the stream (fewer rows to compute)
                run.keep(still_open)
        chosen = np.where(chosen >= 0, chosen, best_k)
        lengths = ((chosen + 1) * n).astype(np.int32)
        if not return_info:
            return ids, lengths
        return ids, lengths, {"l1": np.stack(l1_rows), "iters_run": len(l1_rows),
                              "batch_rows": batch_rows, "recon": recon}

    # -- decoding -----------------------------------------------------------------------------

    def _check_ids(self, ids: Any, lengths: Any) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"expected integer token ids [B, L], got {ids.dtype} {ids.shape}")
        lengths = np.full((ids.shape[0],), ids.shape[1]) if lengths is None else \
            np.asarray(lengths).reshape(-1)
        if lengths.shape[0] != ids.shape[0]:
            raise ValueError(f"lengths has {lengths.shape[0]} entries for {ids.shape[0]} images")
        n = self.tokens_per_iter
        bad = (lengths % n != 0) | (lengths < n) | (lengths > min(ids.shape[1], self.max_tokens))
        if bad.any():
            raise ValueError(f"lengths must be multiples of {n} in [{n}, "
                             f"{min(ids.shape[1], self.max_tokens)}], got {lengths[bad][:8]}")
        valid = np.arange(ids.shape[1])[None] < lengths[:, None]
        codebook = self.config.codebook_size
        if ((ids < 0) | (ids >= codebook))[valid].any():
            raise ValueError(f"token ids must be in [0, {codebook}) within each image's length")
        return np.where(valid, ids, 0).astype(np.int32), lengths.astype(np.int32)

    def decode_logits(self, ids: Any, lengths: Any = None) -> jax.Array:
        ids, lengths = self._check_ids(ids, lengths)
        ids = ids[:, :int(lengths.max())]  # one compiled shape per distinct max length
        return self._decode(self.variables(), jnp.asarray(ids), jnp.asarray(lengths))

    def decode(self, ids: Any, lengths: Any = None) -> jax.Array:
        """Images ``[B, H, W, 3]`` in [0, 1] from (padded) ids and per-image lengths; without
        ``lengths`` every row is decoded at its full width."""
        ids, lengths = self._check_ids(ids, lengths)
        ids = ids[:, :int(lengths.max())]  # one compiled shape per distinct max length
        return self._decode_images(self.variables(), jnp.asarray(ids), jnp.asarray(lengths))

    def save(self, directory: str | os.PathLike) -> None:
        native.save_native(directory, self.config, jax.device_get(self.params))


def _bucket(n: int, limit: int) -> int:
    return min(limit, 1 << max(n - 1, 0).bit_length())


class _Rollout:
    """Host-side driver of the per-iteration jitted functions over a batch that may shrink.

    ``rows[i]`` is the original image index of batch row i; rows past ``num_real`` repeat an
    image to fill a power-of-two bucket (bounding the number of compiled shapes) and are
    ignored. Halting inputs are indexed per image: injected masks by row, and Bernoulli draws
    from per-iteration uniforms over the original batch, so results never depend on the rows.
    """

    def __init__(self, tok: ALITTokenizer, images, masks, rng, num_iters: int):
        self.tok, self.rng, self.num_iters = tok, rng, num_iters
        x = check_images(images, tok.image_size)
        self.batch = x.shape[0]
        self.mode, self.masks = tok._halting(masks, rng, num_iters, self.batch)
        self.rows = np.arange(self.batch)
        self.num_real = self.batch
        self.images = x
        self.stream, self.gt_ids = tok.start_fn(tok.variables(), x)

    def _halting_input(self, k: int):
        if self.mode == "inject":
            return self.masks[k][self.rows]
        if self.mode == "bernoulli":
            u = jax.random.uniform(jax.random.fold_in(self.rng, k),
                                   (self.batch, self.tok.module.grid_tokens))
            return u[self.rows]
        return None

    def step(self, k: int, codes_only: bool = False) -> dict:
        v = self.tok.variables()
        if codes_only:
            return {"codes": self.tok.codes_fn(v, self.stream)}
        self.stream, out = self.tok.iteration_fn(k, self.mode)(
            v, self.stream, self.gt_ids, self._halting_input(k))
        return out

    def keep(self, images: np.ndarray) -> None:
        """Keeps only these original image indices (a subset of the current ones)."""
        size = _bucket(len(images), self.batch)
        if size == len(self.rows):
            return
        position = {int(r): i for i, r in reversed(list(enumerate(self.rows[:self.num_real])))}
        sel = np.array([position[int(i)] for i in images] + [position[int(images[0])]] *
                       (size - len(images)))
        self.rows = self.rows[sel]
        self.num_real = len(images)
        self.stream, self.gt_ids, self.images = (
            self.stream[sel], self.gt_ids[sel], self.images[sel])


# Module methods used through ``apply`` (kept outside the class so the module stays lean).

def start_stream(m, images):
    z, gt_ids = m.vqgan_targets(images)
    return m.start(images, z), gt_ids


def stream_iteration(m, x, gt_ids, injected, *, k: int, halting: str, last: bool):
    """One iteration + halting + growth. ``injected``: bool masks (``inject``) or uniform
    variates (``bernoulli``: draw = u < p_gt, which is ``jax.random.bernoulli``)."""
    from titok_jax.models.alit import halting_mask
    x, out = m.step(x, gt_ids)
    if halting == "bernoulli":
        mask = halting_mask(out.p_gt, halting, m.halting_threshold, None, injected < out.p_gt)
    else:
        mask = halting_mask(out.p_gt, halting, m.halting_threshold, None, injected)
    if mask is not None:
        x = m.halt(x, mask)
    if not last:
        x = m.grow(x, k + 1)
    result = {"codes": out.codes, "latent_tokens": out.latent_tokens, "p_gt": out.p_gt,
              "logits": out.logits,
              "halting_mask": jnp.zeros(out.p_gt.shape, bool) if mask is None else mask}
    return x, result


def stream_codes(m, x):
    """Encoder pass + quantization of a stream (no decoder): the codes of that iteration."""
    x = m.encoder(x)
    return m.bottleneck(x[:, 1 + m.grid_tokens:])[2]


def _decode_ids(m, ids, lengths):
    return m.decode_logits(m.lookup(ids), lengths)


def decode_images(m, ids, lengths):
    """Ids (zero past each length) -> images in [0, 1], one program: decoder logits, the VQGAN's
    pixels, clipping (what :meth:`ALITTokenizer.decode` runs, and the serving artefact)."""
    return jnp.clip(m.decode_pixels(_decode_ids(m, ids, lengths)), 0.0, 1.0)
