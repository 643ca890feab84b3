"""The one configuration mechanism of every script: a dataclass of options read by `transformers.HfArgumentParser`,
from a YAML or JSON file (`--config`) plus command-line overrides, with nested sections for the model and the loss.

    options = parse_options(TrainingOptions, sections={"model": OptVQConfig, "loss": OptVQLossConfig})

- Every field of the options dataclass is a `--field` flag with the help text of its `metadata={"help": ...}`.
- A section (`model`, `loss`) is a field holding a dict of another class's fields (an `OptVQConfig`, a dataclass); its
  keys are flags `--model.num_codes`, and `model:` a mapping in the file. Their help comes from the class's "Args:"
  docstring (transformers style) or its dataclass metadata.
- File values are checked against the field's type; command-line values are parsed by `HfArgumentParser` (top-level
  fields) or by the same type rules (section fields).
- An unknown field, in the file or on the command line, is a `ValueError` with a did-you-mean; so is a prefix
  abbreviation (`--model.num_code 5`), which argparse would otherwise take for `--model.num_codes`.

HfArgumentParser alone knows neither sections nor files merged with overrides; that is all this layer adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from transformers import HfArgumentParser

CONFIG_FLAG = "--config"


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A field of an options dataclass with its `--help` text (a list or dict default is copied per instance)."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


# ---------------------------------------------------------------------------------------------------------------------
# Types and values
# ---------------------------------------------------------------------------------------------------------------------
def field_types(cls: type) -> dict[str, Any]:
    """Keyword argument name -> type hint of a class's `__init__` (a dataclass's fields, a config's arguments)."""
    hints = typing.get_type_hints(cls.__init__)
    return {
        name: hints.get(name, Any)
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    }


_NONE_STRINGS = ("none", "null", "~")
_TRUE_STRINGS = ("true", "yes", "1")
_FALSE_STRINGS = ("false", "no", "0")


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` (from a file or a command-line string) converted to the type `hint`; a `ValueError` naming `name`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS):
            if type(None) in args:
                return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return coerce(value, option, name)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        for allowed in args:
            if value == allowed or (isinstance(value, str) and not isinstance(allowed, str) and value == str(allowed)):
                return allowed
        raise ValueError(f"{name} must be one of {list(args)}, got {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS + _FALSE_STRINGS:
            return value.strip().lower() in _TRUE_STRINGS
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d[\d_]*\s*", value):
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                raise ValueError(f"{name} is NaN; give a number")
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)  # also "1e-4", which YAML 1.1 reads as a string
            except ValueError:
                pass
            else:
                if math.isnan(number):
                    raise ValueError(f"{name} is NaN; give a number")
                return number
        raise ValueError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f'{name} must be a string, got {value!r} (quote it in YAML: {name}: "{value}")')
    if origin in (tuple, list, Sequence, typing.Sequence) or hint in (tuple, list):
        if isinstance(value, str):
            import yaml

            text = value.strip()
            value = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        item_hint = args[0] if args else Any
        items = [coerce(item, item_hint, f"{name}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin is dict or hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError(f"{name} must be a mapping, got {value!r}")
    return value


def unknown_field_error(name: str, known: Iterable[str], where: str) -> ValueError:
    """`ValueError` for an unknown field, with the closest known name (or the list of them)."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
    return ValueError(f"unknown field {name!r} in {where}{hint}")


# ---------------------------------------------------------------------------------------------------------------------
# Help texts of a section class
# ---------------------------------------------------------------------------------------------------------------------
_ARG_LINE = re.compile(r"^(\s*)([A-Za-z_]\w*) \(`[^)]*\)(?::\s*(.*))?$")


def docstring_arguments(cls: type) -> dict[str, str]:
    """Field name -> help text, from a transformers-style "Args:" docstring (`name (`type`, ...):` then the text,
    on the same line or indented below it) and from dataclass `metadata={"help": ...}`, which wins."""
    helps: dict[str, str] = {}
    lines = inspect.getdoc(cls).splitlines() if inspect.getdoc(cls) else []
    current, indent = None, None
    for line in lines:
        match = _ARG_LINE.match(line)
        if match and (indent is None or len(match.group(1)) == indent):
            indent, current = len(match.group(1)), match.group(2)
            helps[current] = (match.group(3) or "").strip()
        elif current is not None and line.strip() and len(line) - len(line.lstrip()) > (indent or 0):
            helps[current] = f"{helps[current]} {line.strip()}".strip()
        elif current is not None and not line.strip():
            current = None
    if dataclasses.is_dataclass(cls):
        for field in dataclasses.fields(cls):
            if field.metadata.get("help"):
                helps[field.name] = field.metadata["help"]
    return helps


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------
def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML or JSON file's top-level mapping (an empty file: `{}`); a `ValueError` for anything else."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        content = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise ValueError(f"config file {path!r} is not valid {kind}: {error}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of fields, got {type(content).__name__}")
    return content


# ---------------------------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------------------------
def build_parser(
    cls: type, sections: Mapping[str, type] | None = None, default_config: str | None = None, description: str = ""
) -> HfArgumentParser:
    """The `HfArgumentParser` of `cls` (prefix abbreviations off), with `--config` and the sections' flags."""
    sections = dict(sections or {})
    parser = HfArgumentParser(cls, allow_abbrev=False, exit_on_error=False, description=description)
    parser.add_argument(
        CONFIG_FLAG,
        default=default_config,
        help="YAML or JSON file of options; flags given on the command line override it"
        + (" (default: %(default)s)" if default_config else ""),
    )
    for section, section_cls in sections.items():
        group = parser.add_argument_group(f"{section} ({section_cls.__name__} fields)")
        helps = docstring_arguments(section_cls)
        for name, hint in field_types(section_cls).items():
            group.add_argument(
                f"--{section}.{name}",
                default=argparse.SUPPRESS,
                metavar="VALUE",
                help=f"{helps.get(name, '')} [{_type_name(hint)}]".strip(),
            )
    return parser


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def parse_options(
    cls: type,
    argv: Sequence[str] | None = None,
    *,
    sections: Mapping[str, type] | None = None,
    default_config: str | os.PathLike | None = None,
    description: str = "",
) -> Any:
    """An instance of the dataclass `cls` from `--config FILE` (optional) and the command line (`argv`, default
    `sys.argv[1:]`), the command line winning. A field named in `sections` holds a dict of that class's fields."""
    import sys

    sections = dict(sections or {})
    argv = list(sys.argv[1:] if argv is None else argv)
    default_config = os.fspath(default_config) if default_config is not None else None
    parser = build_parser(cls, sections, default_config, description)
    types_ = field_types(cls)
    for section in sections:
        if section not in types_:
            raise TypeError(f"{cls.__name__} has no field {section!r} to hold the {section!r} section")

    # File values become the parser's defaults, so that flags on the command line win.
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(CONFIG_FLAG, default=default_config)
    config_path = pre.parse_known_args(argv)[0].config
    file_values = load_config_file(config_path) if config_path else {}
    where = f"config file {config_path!r}"
    section_values: dict[str, dict[str, Any]] = {name: {} for name in sections}
    top_values: dict[str, Any] = {}
    for key, value in file_values.items():
        key = str(key)
        if key not in types_:
            raise unknown_field_error(key, types_, where)
        if key in sections:
            if not isinstance(value, Mapping):
                raise ValueError(f"{key} in {where} must be a mapping of {sections[key].__name__} fields")
            for inner, inner_value in value.items():
                section_values[key][str(inner)] = _section_value(sections[key], key, str(inner), inner_value, where)
        else:
            top_values[key] = coerce(value, types_[key], key)
    parser.set_defaults(**top_values)

    # HfArgumentParser types an optional field by its inner type; "none" / "null" unsets it, as in the file.
    argv, unset = _take_unset_optionals(argv, {name: hint for name, hint in types_.items() if name not in sections})
    try:
        namespace, extras = parser.parse_known_args(argv)
    except argparse.ArgumentError as error:
        raise ValueError(str(error)) from None
    if extras:
        # Prefix abbreviations land here too (allow_abbrev=False): `--model.num_code 5` must not set num_codes.
        flags = [item for item in extras if item.startswith("--")]
        name = (flags or extras)[0].split("=", 1)[0]
        known = [CONFIG_FLAG] + [f"--{field}" for field in types_ if field not in sections]
        known += [
            f"--{section}.{field}" for section, section_cls in sections.items() for field in field_types(section_cls)
        ]
        close = sorted(option for option in known if option.startswith(name)) or difflib.get_close_matches(name, known)
        hint = f"; did you mean {close[0]!r}?" if close else "; see --help for the fields"
        raise ValueError(f"unknown command-line argument {name!r}{hint}")
    values = vars(namespace)
    values.pop("config", None)
    values.update(dict.fromkeys(unset))
    for key in [key for key in values if "." in key]:
        section, _, inner = key.partition(".")
        section_values[section][inner] = _section_value(
            sections[section], section, inner, values.pop(key), "the command line"
        )
    for section in sections:
        values[section] = section_values[section]
    for name, value in values.items():  # float("nan") parses, and then passes every `value > limit` check silently
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{name} is NaN; give a number")
    return cls(**values)


def _take_unset_optionals(argv: list[str], hints: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    optional = {name for name, hint in hints.items() if type(None) in typing.get_args(hint)}
    kept, unset, position = [], [], 0
    while position < len(argv):
        item = argv[position]
        name, _, inline = item[2:].partition("=") if item.startswith("--") else ("", "", "")
        value = inline if inline else (argv[position + 1] if position + 1 < len(argv) else "")
        if name in optional and value.strip().lower() in _NONE_STRINGS:
            unset.append(name)
            position += 1 if inline else 2
            continue
        kept.append(item)
        position += 1
    return kept, unset


def _section_value(section_cls: type, section: str, name: str, value: Any, where: str) -> Any:
    section_types = field_types(section_cls)
    if name not in section_types:
        raise unknown_field_error(name, section_types, f"the {section!r} section of {where}")
    return coerce(value, section_types[name], f"{section}.{name}")


def options_to_dict(options: Any) -> dict[str, Any]:
    """A parsed options dataclass as a plain mapping (tuples as lists), e.g. to write `training_config.yaml`."""
    return json.loads(json.dumps(dataclasses.asdict(options), default=list))
