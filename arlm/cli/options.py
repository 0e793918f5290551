"""Command-line options derived from the config dataclasses, so a setting has one name, one
default and one help text: the field's (``arlm.config.option``).

A field becomes ``--field-name`` (or its ``flag``); ``bool`` fields are switches (``--no-...``
for those on by default, both for those whose default None means "by the machine"), ``list``
fields repeat, ``dict[int, float]`` fields take ``K=V``. Only options given on the command line
reach the dataclass, so its defaults stay the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _base_type(hint) -> tuple[type, type | None]:
    """(outer type, element type) of a field's hint, without ``| None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    origin = typing.get_origin(hint)
    if origin in (list, dict):
        return origin, typing.get_args(hint)
    return hint, None


def _key_value(text: str) -> tuple[int, float]:
    key, _, value = text.partition("=")
    try:
        return int(key), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ID=VALUE, e.g. 50256=-100") from None


def add_options(parser, cls, *, prefix: str = "", dest_prefix: str = "", help: str = "") -> None:
    """Add an option for every field of ``cls`` with help text (or every field, with ``help``
    as their shared text); ``prefix`` goes before derived flag names."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help", help)
        if not text:
            continue
        outer, inner = _base_type(hints[f.name])
        default = getattr(defaults, f.name)
        flag = f.metadata.get("flag", f"--{prefix}{f.name.replace('_', '-')}")
        kw: dict = {"dest": dest_prefix + f.name, "default": None}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if "metavar" in f.metadata:
            kw["metavar"] = f.metadata["metavar"]
        if outer is bool:
            if default is None:  # unset picks a default by the machine: both switches
                kw.update(action=argparse.BooleanOptionalAction, help=text)
            elif default:
                flag = "--no-" + flag.removeprefix("--")
                kw.update(action="store_false", help=f"do not {text[0].lower()}{text[1:]}")
            else:
                kw.update(action="store_true", help=text)
        elif outer is list:
            kw.update(action="append", type=inner[0], help=text)
        elif outer is dict:
            kw.update(action="append", type=_key_value, help=text)
        else:
            shown = "" if default is None or "default:" in text else f" (default: {default})"
            kw.update(type=outer, help=text + shown)
        parser.add_argument(flag, **kw)


def given(args: argparse.Namespace, cls, dest_prefix: str = "") -> dict:
    """The fields of ``cls`` given on the command line, as keyword arguments."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, dest_prefix + f.name, None)
        if value is None:
            continue
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            value = dict(value)
        out[f.name] = value
    return out
