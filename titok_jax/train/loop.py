"""The one training loop, big_vision style: read it top to bottom. It names no model; the task
chosen by ``config.task`` (``train/tasks``) supplies everything model-specific.

mesh -> task -> data -> abstract state -> shardings -> init or restore -> jitted steps -> loop
(metrics, image grids, evaluations, checkpoints, preemption) -> export.

Any path may be ``gs://`` (``etils.epath``; Orbax writes checkpoints through tensorstore).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from titok_jax.data import pipeline as data_lib
from titok_jax.infra import checkpointing, paths, sharding
from titok_jax.train import tasks as tasks_lib
from titok_jax.train.state import TrainState, init_state
from titok_jax.train.tasks.base import Task

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs, built for one mesh (tests build it for 1 and 8 devices)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    task: Task
    frozen: Any                    # the task's frozen parts, replicated
    abstract_state: Any            # ShapeDtypeStructs carrying their shardings
    state_shardings: Any
    init_state: Any                # jitted rng -> TrainState, born sharded
    steps: dict[str, Any]          # kind -> jitted (state, batch, frozen, key) -> (state, metrics)
    batch_sharding: jax.sharding.NamedSharding

    def step(self, state: TrainState, batch: dict, step: int) -> tuple[TrainState, dict]:
        """Runs global step ``step`` (its kind chosen by the task; RNG from
        ``fold_in(seed, step)``, so a resumed run draws the same keys)."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), step)
        return self.steps[self.task.step_kind(step)](state, batch, self.frozen, key)


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Trainer:
    # Softmax differentiated by its custom JVP (from its output alone) instead of through
    # exp / sum / divide, which kept about three [B, heads, T, T] float32 buffers per attention
    # layer alive for the backward: -3.8 GiB at the peak of the L-32 stage-1 step at batch 8
    # (benchmarks/memory.py). The same function, a different gradient formula.
    jax.config.update("jax_softmax_custom_jvp", True)
    if config.global_batch % mesh.size:
        raise ValueError(f"global_batch {config.global_batch} is not divisible by the "
                         f"{mesh.size} devices")
    task = tasks_lib.get(config)
    replicated = sharding.replicated(mesh)
    frozen = jax.device_put(task.frozen(), replicated)

    def init(rng):
        params = task.init_params(rng)
        return init_state(params, task.optimizers(params), task.init_mutable())

    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
    rules = [(r, jax.sharding.PartitionSpec(*spec)) for r, spec in config.mesh.rules]
    state_shardings = sharding.tree_shardings(abstract_state, mesh, rules, fsdp=config.mesh.fsdp,
                                              fsdp_min_size=config.mesh.fsdp_min_size)
    abstract_state = jax.tree_util.tree_map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_state,
        state_shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    # Steps are pure; the state is donated.
    steps = {kind: jax.jit(fn, donate_argnums=(0,),
                           in_shardings=(state_shardings, batch_sharding, replicated, replicated),
                           out_shardings=(state_shardings, replicated))
             for kind, fn in task.steps.items()}
    return Trainer(config, mesh, task, frozen, abstract_state, state_shardings,
                   jax.jit(init, out_shardings=state_shardings), steps, batch_sharding)


def input_pipeline(kind: str, config: ml_collections.ConfigDict, data_dir: str,
                   image_size: int | None = None):
    """The training batches a task reads; ``batch(step)`` is a pure function of (seed, step).
    ``kind``: ``images`` (a TFDS split, ``config.data``; ``image_size``: the task's, default
    ``config.model.image_size``) or ``tokens`` (a pre-tokenized dataset,
    ``config.data.tokens``)."""
    if kind == "images":
        return data_lib.TrainPipeline(
            dataset=config.data.dataset, data_dir=data_dir, split=config.data.train_split,
            global_batch=config.global_batch, image_size=image_size or config.model.image_size,
            seed=config.seed, num_threads=config.data.num_threads,
            workers=config.data.get("workers", 0))
    if kind == "tokens":  # pre-tokenized data (titok-jax pretokenize)
        from titok_jax.data.tokens import TokenTrainPipeline
        return TokenTrainPipeline(config.data.tokens, global_batch=config.global_batch,
                                  seed=config.seed)
    raise ValueError(f"no input pipeline for batches of kind {kind!r}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config.task`` in ``workdir`` (resuming from its checkpoints); returns the state."""
    from clu import metric_writers, parameter_overview, periodic_actions

    workdir = paths.as_path(workdir)
    is_main = jax.process_index() == 0
    if config.progress_bar:  # the bar shows progress and loss; keep Orbax's INFO lines out of it
        logging.getLogger("absl").setLevel(logging.WARNING)

    # Mesh, task, shardings (a bad config or missing teacher fails before anything is written).
    t = build_trainer(config, sharding.make_mesh())
    task = t.task

    # Data: every host reads its slice of each global batch.
    data_dir = data_lib.resolve_data_dir(config.data)
    train_data = input_pipeline(task.input_kind, config, data_dir, task.image_size)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)

    # Restore (refusing a changed config or an unrestorable checkpoint), or init born sharded.
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", keep=config.keep_ckpts,
                                      save_every=config.ckpt_every)
    try:
        restored = ckpt.restore_for_resume(t.abstract_state, config,
                                           allow_changes=config.allow_config_changes,
                                           fallback=config.checkpoint_fallback)
    except BaseException:
        ckpt.close()
        train_data.close()
        raise
    if restored is not None:
        state, _, step0 = restored
        log.info("resumed from step %d in %s", step0, workdir)
    else:
        state = t.init_state(jax.random.PRNGKey(config.seed))
        if config.init_from:
            state = task.warm_start(state, config.init_from)
        step0 = 0
    if is_main:
        parameter_overview.log_parameter_overview(state.params, msg="trainable parameters")

    predictor = task.predictor()
    recon_fn = jax.jit(lambda p, x: predictor.reconstruct(p, x)["recon"])
    evaluation = None
    if config.eval_every:
        from titok_jax.evals import runner as eval_lib
        evaluation = eval_lib.from_config(config, data_dir, t.mesh, predictor=predictor)
    grid_images = data_lib.first_eval_images(config.data, data_dir, config.num_grid_images,
                                             task.image_size) if config.image_every else None

    writer = metric_writers.create_default_writer(
        str(workdir) if config.tensorboard else None,
        just_logging=not (is_main and config.tensorboard))
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every)
    preempt = checkpointing.PreemptionFlag()
    progress = _progress_bar(config, step0) if is_main else None
    meta = {"task": task.name, "config": json.loads(config.to_json_best_effort())}
    last_log, pending = time.perf_counter(), None
    try:
        for step, host_batch in train_data.iterate(start_step=step0):
            if step >= config.total_steps:
                break
            batch = data_lib.to_global(host_batch, t.batch_sharding)
            state, metrics = t.step(state, batch, step)
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
                _write_grid(writer, workdir, done, grid_images,
                            recon_fn(task.predict_params(state, t.frozen), grid_images), is_main,
                            task.grid_kind)
            if evaluation is not None and done % config.eval_every == 0:
                results = evaluation(task.predict_params(state, t.frozen))
                writer.write_scalars(done, {f"eval/{k}": v for k, v in results.items()})
                eval_lib.write_results(results, str(workdir / "eval" / f"step_{done:07d}.json"),
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


def _grid(images, recon, kind: str) -> np.ndarray:
    from titok_jax.data.images import image_grid, side_by_side_grid
    if kind == "samples":
        return image_grid(np.asarray(recon), columns=min(8, len(recon)))
    return side_by_side_grid(zip(np.asarray(images), np.asarray(recon)))


def _write_grid(writer, workdir, step: int, images, recon, is_main: bool,
                kind: str = "reconstructions") -> None:
    from titok_jax.data.images import save_png
    grid = _grid(images, recon, kind)
    writer.write_images(step, {"samples" if kind == "samples" else "inputs_vs_reconstructions":
                               grid[None]})
    if is_main:
        save_png(grid, str(workdir / "images" / f"step_{step:07d}.png"))


def _write_final_outputs(config, workdir, t: Trainer, state, recon_fn, data_dir) -> None:
    """The task's export (``export/``, loadable by ``load_tokenizer`` / ``load_generator`` and
    the CLI) and, for a tokenizer, reconstructions of held-out images with their grid
    (``reconstructions/``); for a generator, its fixed grid of samples (``samples/``)."""
    from titok_jax.data.images import save_png
    t.task.export(state, t.frozen, str(workdir / "export"))
    if not config.num_grid_images:
        return
    images = data_lib.first_eval_images(config.data, data_dir, config.num_grid_images,
                                        t.task.image_size)
    recon = np.asarray(recon_fn(t.task.predict_params(state, t.frozen), images))
    kind = t.task.grid_kind
    out = workdir / kind
    for i, (original, rec) in enumerate(zip(np.asarray(images), recon)):
        if kind == "samples":
            save_png(rec, str(out / f"sample_{i:02d}_class_{i % t.task.num_classes:04d}.png"))
        else:
            save_png(original, str(out / f"heldout_{i:02d}_input.png"))
            save_png(rec, str(out / f"heldout_{i:02d}_recon.png"))
    save_png(_grid(images, recon, kind), str(out / "grid.png"))
    log.info("wrote %d %s and grid.png to %s", len(recon),
             "samples" if kind == "samples" else "held-out reconstructions", out)


def _check_finite(pending, ckpt) -> None:
    step, flag = pending
    if float(jax.device_get(flag)) > 0:
        ckpt.wait()
        steps = ckpt.all_steps()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step}; stopping without saving. The last good "
            f"checkpoint ({max(steps) if steps else 'none'}) is kept in {ckpt.directory}.")


def _progress_bar(config, initial: int):
    if not config.progress_bar:
        return None
    from tqdm import tqdm
    return tqdm(total=config.total_steps, initial=initial, desc="train", unit="step")
