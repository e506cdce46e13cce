"""Flags and TRIPTYCH_* environment variables made from the config dataclasses' fields.

Every field of a service config (and of its nested ServerConfig) becomes `--field-name`
(or the field's `flag` metadata), with `TRIPTYCH_FIELD_NAME` as its default when set.
Precedence: flag, then environment, then the dataclass default. Lists (tuple fields)
repeat the flag, or join their values with ':' in the environment, like PATH (or with the field's
`separator`, e.g. ',' for addresses).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "TRIPTYCH_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True)
class ConfigFlag:
    """One config field as the command line and the environment see it."""

    name: str  # field name, also the argparse dest, e.g. "max_message_mib"
    section: str | None  # nested config holding it, e.g. "server"; None: the service config itself
    field: dataclasses.Field
    type: Any  # resolved annotation, e.g. int, Path, tuple[Path, ...]

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag") or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.removeprefix("--").replace("-", "_").upper()

    @property
    def required(self) -> bool:
        return self.field.default is dataclasses.MISSING and self.field.default_factory is dataclasses.MISSING

    @property
    def default(self) -> Any:
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return self.field.default

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.type) is tuple

    @property
    def separator(self) -> str:
        """What separates a list's values in the environment."""
        return self.field.metadata.get("separator", os.pathsep)

    @property
    def is_bool(self) -> bool:
        return self.type is bool

    @property
    def metavar(self) -> str:
        if typing.get_origin(self.type) is typing.Literal:
            return "{" + ",".join(typing.get_args(self.type)) + "}"
        return self.flag.removeprefix("--").replace("-", "_").upper()

    def help(self, default: Any) -> str:
        text = self.field.metadata.get("help") or self.name.replace("_", " ")  # a plain field: its name
        shown = "" if self.required or default in ((), None) else f"; default {default}"
        return f"{text} [env {self.env}{shown}]"

    def parse(self, text: str) -> Any:
        """One value from its text form (a flag argument, or one element of a list)."""
        kind = typing.get_args(self.type)[0] if self.is_list else self.type
        if self.is_bool:
            if text.lower() not in _TRUE | _FALSE:
                raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")
            return text.lower() in _TRUE
        if typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            if text not in choices:
                raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
            return text
        return kind(text)

    def format(self, value: Any) -> list[str]:
        """The command-line arguments that give this field `value` (for child processes)."""
        if self.is_list:
            return [x for v in value for x in (self.flag, str(v))]
        if self.is_bool:  # argparse.BooleanOptionalAction: --flag / --no-flag, no argument
            return [self.flag if value else "--no-" + self.flag.removeprefix("--")]
        return [self.flag, str(value)]


def _resolve(kind: Any) -> Any:
    """`X | None` -> X: an optional field takes the same text as a required one."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return kind


def config_flags(config_cls: type, section: str | None = None) -> Iterator[ConfigFlag]:
    """Every leaf field of a config dataclass, nested configs (ServerConfig) flattened."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = _resolve(hints[f.name])
        if dataclasses.is_dataclass(kind):
            yield from config_flags(kind, section=f.name)
        else:
            yield ConfigFlag(f.name, section, f, kind)


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type, *, skip: frozenset[str] = frozenset(),
                     overrides: dict[str, Any] | None = None) -> None:
    """Adds a flag for each field of `config_cls` not in `skip` and not already on the parser.

    `overrides` replaces dataclass defaults for this command only (e.g. `up` listens on 50051).
    """
    existing = {a.dest for a in parser._actions}  # noqa: SLF001 — the union of several configs (`up`)
    for cf in config_flags(config_cls):
        if cf.name in skip or cf.name in existing:
            continue
        env = os.environ.get(cf.env)
        default = overrides.get(cf.name, cf.default) if overrides else cf.default
        kwargs: dict[str, Any] = {"dest": cf.name, "help": cf.help(default), "metavar": cf.metavar}
        if cf.is_list:
            # Lists append to None, then config_from_args falls back to the env or the default:
            # argparse would append flags to a non-empty default instead of replacing it.
            kwargs.update(action="append", type=cf.parse, default=None, required=cf.required and env is None)
        elif cf.is_bool:
            kwargs.update(action=argparse.BooleanOptionalAction, metavar=None,
                          default=cf.parse(env) if env is not None else cf.default)
        else:
            # A string default goes through `type`, so a malformed env value is a usage error.
            kwargs.update(type=cf.parse, default=env if env is not None else default,
                          required=cf.required and env is None)
        parser.add_argument(cf.flag, **kwargs)


def _value(cf: ConfigFlag, args: argparse.Namespace) -> Any:
    value = getattr(args, cf.name)
    if cf.is_list:
        if value is None:
            env = os.environ.get(cf.env)
            value = [cf.parse(x) for x in env.split(cf.separator) if x] if env else cf.default
        return tuple(value)
    return value


def config_from_args(config_cls: type, args: argparse.Namespace):
    """Builds `config_cls` (and its nested configs) from parsed flags."""
    hints = typing.get_type_hints(config_cls)
    flat = {cf.name: cf for cf in config_flags(config_cls)}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        kind = _resolve(hints[f.name])
        if dataclasses.is_dataclass(kind):
            values[f.name] = config_from_args(kind, args)
        else:
            values[f.name] = _value(flat[f.name], args)
    return config_cls(**values)


def child_argv(config_cls: type, args: argparse.Namespace, *, skip: frozenset[str] = frozenset()) -> list[str]:
    """The flags that give a child process the values `args` holds for `config_cls`'s fields."""
    argv: list[str] = []
    for cf in config_flags(config_cls):
        if cf.name in skip:
            continue
        value = _value(cf, args)
        if value is not None:  # None: unset, the child keeps its default
            argv += cf.format(value)
    return argv


__all__ = ["ConfigFlag", "add_config_flags", "child_argv", "config_flags", "config_from_args", "ENV_PREFIX"]
