"""Tokenizer training (TiTok; ALIT through ``titok_jax/train/alit.py``), big_vision style: read
it top to bottom.

mesh -> data -> abstract shapes -> shardings -> params born sharded -> jitted step -> restore
-> loop (metrics, image grids, checkpoints, preemption).

Objectives (``config.loss``):
* ``proxy_ce`` (stage 1 of the paper): the frozen MaskGIT-VQGAN encodes the batch inside the
  step to proxy codes; loss = cross-entropy of the decoder's proxy logits + quantizer loss.
* ``pixel_l2``: mean squared error of the pixel-head reconstruction + quantizer loss (VQ) or
  ``kl_weight`` x KL (VAE): the reconstruction terms of the single-stage recipe, without its
  perceptual and GAN losses. The CPU quickstart uses it, since it has no pretrained teacher.
* ``alit_stage1``: ALIT latent distillation (``config.model.name == "alit"``); the frozen VQGAN
  inside the model plays the teacher's part (see ``train/alit.py``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from titok_jax import sharding, variants
from titok_jax.convert.official import (
    import_official,
    name_map_for,
    read_state_dict,
    read_training_checkpoint,
)
from titok_jax.data import pipeline as data_lib
from titok_jax.losses import stage1_loss
from titok_jax.train import checkpoint as ckpt_lib
from titok_jax.train.state import TrainState, apply_update, make_optimizer

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


def codebook_stats(ids: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """Fraction of codes used in the batch and the perplexity of their distribution."""
    counts = jnp.zeros((codebook_size,), jnp.float32).at[ids.reshape(-1)].add(1.0)
    p = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"codebook_usage": jnp.mean(counts > 0), "codebook_perplexity": jnp.exp(entropy)}


def make_train_step(model, teacher, config, tx, schedule):
    """The pure step ``(state, batch, teacher_params, key) -> (state, metrics)``; ``key`` is
    ``fold_in(seed, step)`` (VAE posterior sampling)."""
    quantizer_weight = config.quantizer_weight
    codebook_size = config.model.codebook_size
    vae = config.model.quantize_mode == "vae"

    def loss_fn(params, images, targets, key):
        out = model.apply({"params": params}, images, rng=key if vae else None)
        if config.loss == "proxy_ce":
            loss, terms = stage1_loss(out.decoded, targets, out.quantizer, quantizer_weight)
            terms["proxy_accuracy"] = jnp.mean(
                jnp.argmax(out.decoded, -1).reshape(targets.shape) == targets)
        else:
            mse = jnp.mean(jnp.square(out.decoded - images))
            if vae:  # official: kl_weight x sum(KL) / batch
                kl = config.kl_weight * jnp.sum(out.posterior.kl()) / images.shape[0]
                loss, terms = mse + kl, {"reconstruction_loss": mse, "kl_loss": kl}
            else:
                q = quantizer_weight * out.quantizer.quantizer_loss
                loss, terms = mse + q, {"reconstruction_loss": mse, "quantizer_loss": q}
        if not vae:
            terms.update(codebook_stats(out.ids, codebook_size))
        return loss, terms

    def step(state: TrainState, batch: dict, teacher_params: Any, key: jax.Array):
        images = batch["image"]
        targets = None
        if config.loss == "proxy_ce":
            targets = jax.lax.stop_gradient(
                teacher.apply({"params": teacher_params}, images, method=teacher.encode))
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, images, targets, key)
        new, metrics = apply_update(state, loss, grads, tx, schedule, config.ema_decay)
        return new, {**metrics, **terms}

    return step


def _build_teacher(config):
    """The frozen MaskGIT-VQGAN (proxy-code teacher and stage-1 image decoder), or (None, {})
    when the objective needs no teacher."""
    if config.loss != "proxy_ce":
        return None, {}
    teacher_cfg = variants.vqgan_model_config(config.teacher.size)
    teacher = variants.build_model(teacher_cfg)
    abstract = jax.eval_shape(teacher.init, jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))["params"]
    if config.teacher.weights:
        params = import_official(read_state_dict(config.teacher.weights), abstract, teacher_cfg)
    else:
        log.warning("config.teacher.weights is empty: using a RANDOM MaskGIT-VQGAN as the "
                    "proxy-code teacher (only meaningful for tests)")
        params = jax.jit(teacher.init)(jax.random.PRNGKey(config.seed + 1),
                                       jnp.zeros((1, 256, 256, 3)))["params"]
    return teacher, params


def _init_state(model, tx_factory, abstract_images, trainable=lambda params: params):
    """rng -> TrainState; ``trainable`` picks the trained part of the model's params."""
    def init(rng):
        params = trainable(model.init(rng, jnp.zeros(abstract_images.shape,
                                                      abstract_images.dtype))["params"])
        tx, _ = tx_factory(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree_util.tree_map(jnp.copy, params),
                          opt_state=tx.init(params))
    return init


def _load_init_weights(config, abstract_params):
    """Optional warm start from an official or titok-jax checkpoint (``config.init_from``).
    ALIT checkpoints hold the VQGAN too; only the trainable part is returned."""
    from titok_jax.convert import native
    from titok_jax.convert.layout import check_params
    alit = _is_alit(config)
    if alit:
        from titok_jax.train import alit as alit_lib
        abstract_params = alit_lib.merge(abstract_params, _vqgan_abstract(config))
    if native.is_native_dir(config.init_from):
        params = check_params(native.load_native(config.init_from)[1], abstract_params,
                              config.init_from)
    else:
        params = import_official(read_training_checkpoint(config.init_from), abstract_params,
                                 config.model)
    return alit_lib.split_frozen(params)[0] if alit else params


def _is_alit(config) -> bool:
    return config.model.name == "alit"


def _vqgan_abstract(config):
    """Shapes of ALIT's frozen VQGAN subtree."""
    from titok_jax.train import alit as alit_lib
    model = variants.build_model(config.model)
    size = config.model.image_size
    return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
                          )["params"][alit_lib.FROZEN]


def reconstruct_for_grid(model, teacher, config):
    """A jitted (params, teacher_params, images) -> images in [0, 1] for image logging."""
    if _is_alit(config):
        from titok_jax.train import alit as alit_lib
        return alit_lib.reconstruct_for_grid(model, config)

    def fn(params, teacher_params, images):
        out = model.apply({"params": params}, images)
        if config.loss == "proxy_ce":
            codes = jnp.argmax(out.decoded, -1).reshape(images.shape[0], -1)
            return teacher.apply({"params": teacher_params}, codes, method=teacher.decode)
        return jnp.clip(out.decoded, 0.0, 1.0)
    return jax.jit(fn)


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs, built for one mesh (tests build it for 1 and 8 devices)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: Any
    teacher: Any
    teacher_params: Any
    abstract_params: Any
    abstract_state: Any            # ShapeDtypeStructs carrying their shardings
    state_shardings: Any
    init_state: Any                # jitted rng -> TrainState, born sharded
    train_step: Any                # jitted (state, batch, teacher_params, key) -> (state, metrics)
    batch_sharding: jax.sharding.NamedSharding


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Trainer:
    _check_supported(config)
    if config.global_batch % mesh.size:
        raise ValueError(f"global_batch {config.global_batch} is not divisible by the "
                         f"{mesh.size} devices")
    model = variants.build_model(config.model)
    size = config.model.image_size
    abstract_images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    name_map = name_map_for(config.model)
    tx_factory = lambda p: make_optimizer(config.optimizer, p, name_map)  # noqa: E731
    if _is_alit(config):
        from titok_jax.train import alit as alit_lib
        teacher, teacher_params = None, alit_lib.load_vqgan(config, model)
        init_fn = _init_state(model, tx_factory, abstract_images,
                              lambda p: alit_lib.split_frozen(p)[0])
    else:
        teacher, teacher_params = _build_teacher(config)
        init_fn = _init_state(model, tx_factory, abstract_images)
    teacher_params = jax.device_put(teacher_params, sharding.replicated(mesh))
    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    abstract_params = abstract_state.params
    tx, schedule = tx_factory(abstract_params)
    step_fn = (alit_lib.make_train_step(model, config, tx, schedule) if _is_alit(config)
               else make_train_step(model, teacher, config, tx, schedule))
    rules = [(r, jax.sharding.PartitionSpec(*spec)) for r, spec in config.mesh.rules]
    state_shardings = sharding.tree_shardings(abstract_state, mesh, rules, fsdp=config.mesh.fsdp,
                                              fsdp_min_size=config.mesh.fsdp_min_size)
    abstract_state = jax.tree_util.tree_map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_state,
        state_shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    # The step is pure; the state is donated; RNG comes from fold_in(seed, step).
    train_step = jax.jit(step_fn, donate_argnums=(0,),
                         in_shardings=(state_shardings, batch_sharding, replicated, replicated),
                         out_shardings=(state_shardings, replicated))
    return Trainer(config, mesh, model, teacher, teacher_params, abstract_params, abstract_state,
                   state_shardings, jax.jit(init_fn, out_shardings=state_shardings), train_step,
                   batch_sharding)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config.model`` in ``workdir`` (resuming from its checkpoints); returns the state."""
    from clu import metric_writers, parameter_overview, periodic_actions

    from titok_jax.data.images import save_png, side_by_side_grid

    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if config.progress_bar:  # the bar shows progress and loss; keep Orbax's INFO lines out of it
        logging.getLogger("absl").setLevel(logging.WARNING)

    # Mesh, model, shardings.
    t = build_trainer(config, sharding.make_mesh())
    model, teacher, teacher_params = t.model, t.teacher, t.teacher_params

    # Data: every host reads its slice of each global batch.
    data_dir = data_lib.resolve_data_dir(config.data)
    train_data = data_lib.TrainPipeline(
        dataset=config.data.dataset, data_dir=data_dir, split=config.data.train_split,
        global_batch=config.global_batch, image_size=config.model.image_size, seed=config.seed,
        num_threads=config.data.num_threads)
    size = config.model.image_size

    # Restore, or params born sharded.
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_ckpts,
                                 save_every=config.ckpt_every)
    restored = ckpt.restore_latest(t.abstract_state)
    if restored is not None:
        state, meta, step0 = restored
        for key, value in (("data_seed", config.seed), ("global_batch", config.global_batch)):
            if meta.get(key) != value:
                raise ValueError(f"the checkpoint was trained with {key}={meta.get(key)}, the "
                                 f"config says {value}: resuming would change the data order")
        log.info("resumed from step %d in %s", step0, workdir)
    else:
        state = t.init_state(jax.random.PRNGKey(config.seed))
        if config.init_from:
            params = jax.device_put(_load_init_weights(config, t.abstract_params),
                                    t.state_shardings.params)
            state = state.replace(params=params,
                                  ema_params=jax.tree_util.tree_map(jnp.copy, params))
        step0 = 0
    if is_main:
        parameter_overview.log_parameter_overview(state.params, msg="trainable parameters")

    recon_fn = reconstruct_for_grid(model, teacher, config)
    evaluation = None
    if config.eval_every:
        from titok_jax.evals import runner as eval_lib
        evaluation = eval_lib.from_config(config, model, teacher, data_dir, t.mesh)
    grid_images = data_lib.first_eval_images(config.data, data_dir, config.num_grid_images,
                                             size) if config.image_every else None

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every)
    preempt = ckpt_lib.PreemptionFlag()
    base_key = jax.random.PRNGKey(config.seed)
    progress = _progress_bar(config, step0) if is_main else None
    meta = {"data_seed": config.seed, "global_batch": config.global_batch}
    last_log, pending = time.perf_counter(), None
    try:
        for step, host_batch in train_data.iterate(start_step=step0):
            if step >= config.total_steps:
                break
            batch = data_lib.to_global(host_batch, t.batch_sharding)
            state, metrics = t.train_step(state, batch, teacher_params,
                                        jax.random.fold_in(base_key, step))
            done = step + 1
            report(done)
            if progress is not None:
                progress.update(1)
            # Check the previous step's flag so the host does not wait on the current step.
            if pending is not None:
                _check_finite(pending, ckpt)
            pending = (done, metrics["nonfinite"])
            if done % config.log_every == 0 or done == config.total_steps:
                _check_finite(pending, ckpt)
                host = jax.device_get(metrics)
                now = time.perf_counter()
                host["images_per_sec"] = config.global_batch * config.log_every / (now - last_log)
                last_log = now
                host.update({f"data/{k}": v for k, v in train_data.stats.items()})
                writer.write_scalars(done, {k: float(v) for k, v in host.items()})
                if progress is not None:
                    progress.set_postfix(loss=f"{float(host['loss']):.4f}")
            if grid_images is not None and (done % config.image_every == 0
                                            or done == config.total_steps):
                recon = np.asarray(recon_fn(state.ema_params, teacher_params, grid_images))
                grid = side_by_side_grid(zip(np.asarray(grid_images), recon))
                writer.write_images(done, {"inputs_vs_reconstructions": grid[None]})
                if is_main:
                    save_png(grid, os.path.join(workdir, "images", f"step_{done:07d}.png"))
            if evaluation is not None and done % config.eval_every == 0:
                results = evaluation({"model": state.ema_params, "teacher": teacher_params})
                writer.write_scalars(done, {f"eval/{k}": v for k, v in results.items()})
                eval_lib.write_results(results, os.path.join(workdir, "eval",
                                                             f"step_{done:07d}.json"),
                                       {"step": done, "split": config.data.eval_split})
            stop = done % config.preemption_check_every == 0 and preempt.should_stop()
            final = stop or done == config.total_steps
            if final or ckpt.due(done):
                _check_finite((done, metrics["nonfinite"]), ckpt)  # never save a bad step
                ckpt.save(done, state, {**meta, "step": done}, force=final)
            if stop:
                log.warning("stopped for preemption at step %d (checkpoint saved)", done)
                break
        if pending is not None:
            _check_finite(pending, ckpt)
        if is_main and int(state.step) >= config.total_steps:
            _write_final_outputs(config, workdir, t, state, recon_fn, data_dir)
    finally:
        ckpt.close()
        writer.flush()
        preempt.restore()
        train_data.close()
        if progress is not None:
            progress.close()
    return state


def _write_final_outputs(config, workdir, t, state, recon_fn, data_dir) -> None:
    """The EMA tokenizer as a titok-jax folder (``export/``, loadable by ``load_tokenizer`` and
    the CLI) and reconstructions of held-out images with their grid (``reconstructions/``)."""
    from titok_jax.convert import native
    from titok_jax.data.images import save_png, side_by_side_grid
    ema = jax.device_get(state.ema_params)
    if _is_alit(config):  # the export holds the whole model, frozen VQGAN included
        from titok_jax.train import alit as alit_lib
        ema = alit_lib.merge(ema, jax.device_get(t.teacher_params))
    native.save_native(os.path.join(workdir, "export"), config.model, ema)
    if not config.num_grid_images:
        return
    images = data_lib.first_eval_images(config.data, data_dir, config.num_grid_images,
                                        config.model.image_size)
    recon = np.asarray(recon_fn(state.ema_params, t.teacher_params, images))
    out = os.path.join(workdir, "reconstructions")
    for i, (original, rec) in enumerate(zip(np.asarray(images), recon)):
        save_png(original, os.path.join(out, f"heldout_{i:02d}_input.png"))
        save_png(rec, os.path.join(out, f"heldout_{i:02d}_recon.png"))
    save_png(side_by_side_grid(zip(np.asarray(images), recon)), os.path.join(out, "grid.png"))
    log.info("wrote %d held-out reconstructions and grid.png to %s", len(recon), out)


def _check_supported(config) -> None:
    if _is_alit(config):
        if config.loss != "alit_stage1":
            raise NotImplementedError(
                f"ALIT training supports loss='alit_stage1' (latent distillation); got "
                f"{config.loss!r}. Stage 2 (full fine-tuning with L1 + LPIPS + PatchGAN per "
                "iteration) is not implemented yet")
        return
    if config.model.finetune_decoder:
        raise NotImplementedError(
            "stage-2 training (decoder fine-tuning with perceptual and GAN losses) is not "
            "implemented yet; train stage 1 with --config configs/titok.py:variant=...,stage=1")
    if config.loss not in ("proxy_ce", "pixel_l2"):
        raise ValueError(f"config.loss must be 'proxy_ce' or 'pixel_l2', got {config.loss!r}")
    if config.loss == "proxy_ce" and not config.model.is_legacy:
        raise ValueError("proxy_ce needs the legacy proxy-code decoder head (stage 1 models)")


def _check_finite(pending, ckpt) -> None:
    step, flag = pending
    if float(jax.device_get(flag)) > 0:
        ckpt.wait()
        steps = ckpt.manager.all_steps()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step}; stopping without saving. The last good "
            f"checkpoint ({max(steps) if steps else 'none'}) is kept in {ckpt.directory}.")


def _progress_bar(config, initial: int):
    if not config.progress_bar:
        return None
    from tqdm import tqdm
    return tqdm(total=config.total_steps, initial=initial, desc="train", unit="step")
