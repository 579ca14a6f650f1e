"""``maskrcnn weights``: the pretrained weights known by name, and where their files go."""

from __future__ import annotations

import argparse

from maskrcnn.cli.errors import USAGE, CommandError


def _run_list(_: argparse.Namespace) -> int:
    from maskrcnn.model.weights import CATALOGUE, cache_dir

    folder = cache_dir()
    for entry in CATALOGUE:
        cached = "cached" if (folder / entry.file_name).is_file() else "not downloaded"
        aliases = f" ({', '.join(entry.aliases)})" if entry.aliases else ""
        if entry.kind == "detector":
            arch = f" model.arch={entry.arch}" if entry.arch != "v1" else ""
            use = f"model.weights=NAME{arch}, or NAME as CKPT"
        else:
            use = "model.backbone_weights=imagenet"
        print(f"{entry.name}{aliases}\n    {entry.kind} {entry.backbone} {entry.arch}; "
              f"{entry.summary()}; {use}; {cached}")
    print(f"cache: {folder} (TORCH_HOME moves it)")
    return 0


def _run_path(args: argparse.Namespace) -> int:
    from maskrcnn.model.weights import cache_dir, lookup

    entry = lookup(args.name)
    if entry is None:
        raise CommandError(f"unknown weights {args.name!r}; see `maskrcnn weights list`", USAGE)
    path = cache_dir() / entry.file_name
    print(path)
    if not path.is_file():
        print(f"not downloaded yet: {entry.url}")
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``weights`` with ``list`` and ``path`` to the CLI."""
    p = subparsers.add_parser(
        "weights", help="pretrained weights by name: list them, find their files",
        description="Weights named here are resolved through torchvision's weights enums and "
        "kept in the torch hub cache ($TORCH_HOME/hub/checkpoints). A name is downloaded (with "
        "its hash checked) the first time a command uses it, never otherwise; offline, put "
        "the file where `maskrcnn weights path NAME` says.",
    )

    def print_help(_: argparse.Namespace) -> int:
        p.print_help()
        return USAGE

    p.set_defaults(func=print_help)
    sub = p.add_subparsers(title="commands", metavar="{list,path}")
    listing = sub.add_parser("list", help="names, what they were trained on, published AP",
                             description="Every weights name, its aliases, what it was "
                             "trained on, its published figures, and whether it is cached.")
    listing.set_defaults(func=_run_list)
    path = sub.add_parser("path", help="the cache file of a name (exit 1: not downloaded)",
                          description="Print the file a weights name is read from; when it is "
                          "not there yet, also the URL to download it from (exit code 1).")
    path.add_argument("name", metavar="NAME", help="a name or alias from `maskrcnn weights list`")
    path.set_defaults(func=_run_path)
