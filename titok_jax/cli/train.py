"""``titok-jax train``: one training run of a config (``configs/*.py``) in a work directory."""
from __future__ import annotations

from titok_jax.cli.args import add_distributed_args


def cmd_train(args, overrides: list[str]) -> int:
    from titok_jax.infra.config import apply_overrides, load_config
    from titok_jax.infra.distributed import maybe_initialize_distributed
    config = load_config(args.config)
    apply_overrides(config, overrides)
    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from titok_jax.train.loop import train_and_evaluate
    train_and_evaluate(config, args.workdir)
    print(f"training done; checkpoints, TensorBoard logs and image grids are in {args.workdir}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a tokenizer; --config.KEY=VALUE overrides config keys")
    p.add_argument("--config", required=True, help="configs/titok.py[:variant=L-32,stage=1]")
    p.add_argument("--workdir", required=True, help="checkpoints, logs; resumes if present")
    add_distributed_args(p)
    p.set_defaults(func=cmd_train)
