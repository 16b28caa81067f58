"""The command-line flags of `ServerArgs`, generated from its fields: `radixkv launch` and
`radixkv bench` take the same flags, with the help text written beside each field in
`radixkv.config`."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from radixkv.config import ServerArgs, parse_size

_TYPES = {"str": str, "int": int, "float": float}


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_server_args(parser: argparse.ArgumentParser | Any, skip: Sequence[str] = ()) -> None:
    """One flag per `ServerArgs` field (`--page-size` for `page_size`), defaults left unset so
    that only the flags given override `ServerArgs`' own defaults."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(ServerArgs):
        if f.name in skip:
            continue
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        default = f.default
        shown = "" if default is None or default is False else f" (default: {default})"
        kwargs: dict[str, Any] = {"default": None, "help": meta["help"] + shown, "dest": f.name}
        if f.type == "bool":  # --flag, and --no-flag for those on by default
            kwargs.update(action=argparse.BooleanOptionalAction if default else "store_true")
        else:
            kind = str(f.type).removesuffix(" | None")
            kwargs.update(type=_size if "parse" in meta else _TYPES[kind])
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            if "const" in meta:  # the value may be left out: `--ray` means `--ray auto`
                kwargs.update(nargs="?", const=meta["const"])
        target = parser
        if "exclusive" in meta:
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["exclusive"]]
        target.add_argument(flag, *meta.get("aliases", ()), **kwargs)


def server_args(ns: argparse.Namespace, skip: Sequence[str] = ()) -> ServerArgs:
    """ServerArgs from the flags `add_server_args` added and the user gave (ValueError on a bad
    combination)."""
    given = {}
    for f in dataclasses.fields(ServerArgs):
        if f.name in skip:
            continue
        value = getattr(ns, f.name, None)
        if value is not None and value != f.default:  # a flag given (0 is a value)
            given[f.name] = value
    return ServerArgs(**given)
