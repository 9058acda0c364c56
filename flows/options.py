"""The ``run`` options, generated from :class:`tasks.settings.ScoreSettings`.

The settings model is the one definition of every parameter (the flow's
signature, the deployments' schema and these options), so an option's type,
choices, default and help come from its field.
"""
from __future__ import annotations

import argparse
import json
import types
import typing
from datetime import datetime

from tasks.settings import ScoreSettings


def flag(name: str) -> str:
    """A setting's command-line option: ``top_k`` -> ``--top-k``."""
    return "--" + name.replace("_", "-")


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`ScoreSettings` field, its type, choices and help from the field."""
    for name, field in ScoreSettings.model_fields.items():
        option = flag(name)
        ann = _unwrap_optional(field.annotation)
        args = typing.get_args(ann)
        kwargs: dict = {"dest": name, "help": field.description.replace("%", "%%")}
        if typing.get_origin(ann) is typing.Literal:
            kwargs["choices"] = list(args)
        elif typing.get_origin(ann) is list:
            kwargs["action"] = "append"
            kwargs["metavar"] = "GLOB"
        elif ann is datetime:
            kwargs["type"] = datetime.fromisoformat
            kwargs["metavar"] = "ISO8601"
        elif ann is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif ann is int:
            kwargs["type"] = int
        elif ann is float:
            kwargs["type"] = float
        elif typing.get_origin(ann) is dict:
            kwargs["type"] = json_object
            kwargs["metavar"] = "JSON"
        kwargs.setdefault("action", _Once)
        if field.is_required():
            kwargs["required"] = True
        else:
            default = field.default_factory() if field.default_factory else field.default
            kwargs["help"] += f" (default: {'unset' if default is None else default})"
            kwargs["default"] = argparse.SUPPRESS
        parser.add_argument(option, **kwargs)


class _Once(argparse.Action):
    """Store an option's value, refusing a second one: ``--input a --input b`` scored b alone (found in review)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice; give it once (--include and --exclude are the options "
                         "that take several)")
        setattr(namespace, self.dest, values)


def _unwrap_optional(ann):
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    return args[0] if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1 else ann


def json_object(text: str) -> dict:
    """An argparse type: a JSON object (storage options)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value
