"""`copd` command line: train | eval | compare | check | selftest.

Errors that users can fix (config, data, checkpoint, layout) end with one line on stderr naming
the file / key / field and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_copd.errors import UserError


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "config",
        nargs="?" if not required else None,
        default=None,
        help="YAML run config (default: the embedded toy CoPD config)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2")


def _cmd_train(args: argparse.Namespace) -> int:
    from megatron_copd.training.entry import train_command

    return train_command(args.config, args.overrides)


def _cmd_eval(args: argparse.Namespace) -> int:
    from megatron_copd.training.entry import eval_command

    return eval_command(args.config, args.overrides, checkpoint=args.checkpoint)


def _cmd_compare(args: argparse.Namespace) -> int:
    from megatron_copd.training.compare import compare_command

    only = [v.strip() for v in args.variants.split(",") if v.strip()]
    return compare_command(args.config, args.overrides, seeds=args.seeds, out=args.out,
                           only=only)


def _cmd_check(args: argparse.Namespace) -> int:
    from megatron_copd.launch_check import check_command

    return check_command(args)


def _cmd_selftest(args: argparse.Namespace) -> int:
    from megatron_copd.selftest import selftest_command

    return selftest_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="copd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=False)

    p = sub.add_parser("train", help="train the branches of a run (default: toy CoPD demo)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on every domain's held-out set")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="torch_dist checkpoint directory")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compare", help="CoPD vs the baselines over several seeds")
    _add_config_args(p)
    p.add_argument("--seeds", type=int, default=3, help="seeds per recipe (default 3)")
    p.add_argument("--variants", default="",
                   help="comma-separated subset, e.g. experts,copd,static_opd (default: all)")
    p.add_argument("--out", default=None, help="output directory (default <run_dir>/compare)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("check", help="check a job's layout and paths before it queues")
    _add_config_args(p)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU (default 80)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "selftest", help="check process groups, peer links and a model forward on the job's ranks"
    )
    _add_config_args(p)
    p.add_argument(
        "--hold",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the checks, stay up this long answering SIGTERM/SIGUSR1 like training "
        "(all ranks exit with the requeue code when signalled)",
    )
    p.add_argument("--p2p-mb", type=float, default=4.0, help="MB sent to each peer (default 4)")
    p.add_argument("--timeout", type=int, default=300, help="collective timeout, s (default 300)")
    p.add_argument("--no-model", action="store_true", help="skip the model build and forward")
    p.set_defaults(func=_cmd_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        args = parser.parse_args(["train", *(argv or [])])
    config = getattr(args, "config", None)
    if config and "=" in config and not os.path.exists(config):
        # `copd train key=value` without a config file: the embedded default + overrides.
        args.overrides = [config, *args.overrides]
        args.config = None
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"copd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("copd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
