"""Linear probing of the frozen encoder: mean-pooled pre-quantization latents -> linear
classifier (optax Adam, full batch, rows sharded over the mesh) -> top-1 accuracy.

Features of ``settings.probe_train_split`` train the classifier and those of
``settings.probe_test_split`` measure it; both are extracted with the eval transform. Features
are standardised with the train mean and standard deviation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from titok_jax.data import pipeline as data_lib
from titok_jax.evals.evaluators import StandaloneEvaluator, register
from titok_jax.infra import sharding


def extract_features(predictor, params, data, split: str, mesh,
                     progress: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """``(features [N, D] float32, labels [N], number of classes)`` of every decodable example
    of ``split``."""
    step = jax.jit(lambda p, b: {"features": predictor.features(p, b["image"]),
                                 "label": b["label"], "mask": b["mask"]},
                   out_shardings=sharding.replicated(mesh))
    feats, labels = [], []
    with data.pipeline(split, predictor.image_size) as pipe:
        batches = iter(pipe)
        if progress and jax.process_index() == 0:
            from tqdm import tqdm
            batches = tqdm(batches, total=len(pipe), desc=f"probe features {split}",
                           unit="batch")
        for host_batch in batches:
            out = jax.device_get(step(params, data_lib.to_global(
                host_batch, sharding.batch_sharding(mesh))))
            feats.append(out["features"][out["mask"]])
            labels.append(out["label"][out["mask"]])
        num_classes = pipe.builder.info.features["label"].num_classes
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels), num_classes


def _sharded_rows(x: np.ndarray, mesh) -> tuple[jax.Array, jax.Array]:
    """Rows padded to a multiple of the mesh size and sharded over it, with a 0/1 weight."""
    n = x.shape[0]
    padded = -(-n // mesh.size) * mesh.size
    rows = np.zeros((padded,) + x.shape[1:], x.dtype)
    rows[:n] = x
    weight = np.zeros((padded,), np.float32)
    weight[:n] = 1.0
    spec = sharding.batch_sharding(mesh)
    return jax.device_put(rows, spec), jax.device_put(weight, spec)


def train_linear_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, mesh, *,
                            steps: int, lr: float, weight_decay: float) -> dict:
    """Full-batch Adam on the weighted softmax cross-entropy + ``weight_decay * |W|^2``."""
    xs, w = _sharded_rows(x, mesh)
    ys, _ = _sharded_rows(y.astype(np.int32), mesh)
    tx = optax.adam(lr)
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

    def loss_fn(p):
        logits = xs @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ys)
        return jnp.sum(ce * w) / jnp.sum(w) + weight_decay * jnp.sum(jnp.square(p["w"]))

    @jax.jit
    def fit(params):
        def body(_, carry):
            p, opt = carry
            grads = jax.grad(loss_fn)(p)
            updates, opt = tx.update(grads, opt, p)
            return optax.apply_updates(p, updates), opt
        return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

    return fit(params)


def top1(params: dict, x: np.ndarray, y: np.ndarray) -> float:
    pred = np.argmax(x @ np.asarray(params["w"]) + np.asarray(params["b"]), axis=1)
    return float(np.mean(pred == y))


@register("linear_probe")
class LinearProbe(StandaloneEvaluator):
    """Top-1 accuracy of a linear classifier on the frozen encoder's mean-pooled latents."""

    def run(self, params, mesh, data, progress):
        s = self.settings
        x_train, y_train, num_classes = extract_features(
            self.predictor, params, data, s.probe_train_split, mesh, progress)
        x_test, y_test, _ = extract_features(
            self.predictor, params, data, s.probe_test_split, mesh, progress)
        mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        clf = train_linear_classifier(x_train, y_train, num_classes, mesh, steps=s.probe_steps,
                                      lr=s.probe_lr, weight_decay=s.probe_weight_decay)
        yield "linear_probe_top1", top1(clf, x_test, y_test)
        yield "linear_probe_train_top1", top1(clf, x_train, y_train)
        yield "linear_probe_num_train", float(len(y_train))
        yield "linear_probe_num_test", float(len(y_test))
