"""The ``maskrcnn`` command: the parser, and every error a user can fix turned into one
``error: ...`` line and an exit code, here and nowhere else."""

from __future__ import annotations

import argparse
import logging
import sys

from maskrcnn.cli import bench, data, export, inference, train, weights
from maskrcnn.cli.errors import FAILED, USAGE, CommandError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn",
        description="Mask R-CNN instance segmentation: train, evaluate, "
        "check and convert datasets.",
        epilog="The command keeps the memory it frees for reuse (fewer page faults per "
        "image, see docs/performance.md); MASKRCNN_MALLOC=system leaves the C library's "
        "default.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, bench, data, inference, export, weights):
        command.register(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """The library's errors that are about the user's files (their message says what and
    where): imported only when an error is being handled, so that ``--help`` loads no torch."""
    import yaml

    from maskrcnn.data.errors import DatasetError
    from maskrcnn.engine.checkpoint import CheckpointError
    from maskrcnn.model.weights import WeightsError

    return DatasetError, CheckpointError, WeightsError, yaml.YAMLError


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes positionals in one run: `train --resume a=1 --config x b=2` leaves b=2
    # over; overrides may come anywhere, so they are collected wherever they are.
    if extra and getattr(args, "overrides", None) is not None and all(
        "=" in e and not e.startswith("-") for e in extra
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    try:
        return int(args.func(args))
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError) as err:
        # An output path that is a file where a folder is needed, or the other way round.
        where = err.filename2 or err.filename
        print(f"error: {where}: {err.strerror}" if where and err.strerror else f"error: {err}",
              file=sys.stderr)
        return USAGE
    except OSError as err:  # the machine's side: a full disk, a failing device
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return FAILED
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
        print(f"error: {err}", file=sys.stderr)
        return USAGE


def run() -> None:
    """The console entry point: ``main`` in a process that reuses the memory it frees
    (see ``maskrcnn.utils.malloc``)."""
    from maskrcnn.utils.malloc import retain_freed_memory

    retain_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    run()
