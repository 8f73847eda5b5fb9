"""One strict config system for every command: YAML file -> typed dataclasses, CLI overrides on top.

Every stage's config section is a (nested) dataclass in `rlrec.schema` with precise types (`Literal` where a
choice belongs) that checks cross-field rules in `__post_init__` by raising `ConfigError`. `load_config` then
guarantees:

- an unknown key fails and names the nearest valid key (no silent typo such as `max_histroy`);
- a duplicated key in the YAML fails (PyYAML would silently keep the last one);
- a value of the wrong type fails with the key path and the expected type (no str->int guessing, no bool->int);
- overrides `--section.key value` (or `section.key=value`) go through the same checks as the file.

The resolved config is written back with `dump_config` into each stage folder, so a run records what it used.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from rlrec.errors import ConfigError

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------------
# YAML reading with duplicate-key detection


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicated mapping keys."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"{node.start_mark.name}:{key_node.start_mark.line + 1}: key '{key}' appears twice "
                f"(first on line {seen[key]})"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 (PyYAML) reads `1e-5` and `3e4` as strings: a float needs a dot there. People write learning rates that
# way, so numbers with an exponent and no dot are floats here, as in YAML 1.2 and Python.
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))  # fmt: skip


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; syntax errors and duplicate keys become `ConfigError` with file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                          "save the recipe as UTF-8") from None  # fmt: skip
    stream = io.StringIO(text)
    stream.name = str(path)  # errors name the file (YAML reads the stream's name)
    try:
        data = yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {err.problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Typed parsing


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _fail(key: str, expected: Any, value: Any) -> ConfigError:
    return ConfigError(f"key '{key}': expected {_type_name(expected)}, got {value!r} ({type(value).__name__})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        # Compare types too, so that True does not pass for Literal[1].
        if any(value == arg and type(value) is type(arg) for arg in get_args(tp)):
            return value
        raise _fail(key, tp, value)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _fail(key, tp, value)
        members = [arg for arg in args if arg is not type(None)]
        if members == [int] and type(None) in args and isinstance(value, int) and value < 1:
            # every optional count (max_users, users, max_train_prompts, threads, beam_width, ...) reads None as
            # "all" or "the default"; 0 would silently mean one of them, or nothing
            raise ConfigError(f"key '{key}': expected an integer >= 1, or null for all / the default; got {value}")
        if len(members) == 1:  # Optional[X]: X's own error is the useful one (e.g. an unknown nested key)
            return _coerce(value, members[0], key)
        for arg in members:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise _fail(key, tp, value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _fail(key, tp, value)
        return _from_mapping(tp, value, key)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, list):
            raise _fail(key, tp, value)
        (item_tp,) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(key, tp, value)
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"key '{key}': expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _fail(key, tp, value)
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if key.rsplit(".", 1)[-1] == "seed" and value < 0:  # numpy and torch take unsigned seeds
                raise ConfigError(f"key '{key}': expected a seed >= 0, got {value}")
            return value
        raise _fail(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .inf / .nan pass YAML as floats and train a NaN model
                raise ConfigError(f"key '{key}': expected a finite number, got {value}")
            return float(value)
        raise _fail(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, tp, value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _fail(key, tp, value)


def _from_mapping(cls: type[T], data: Mapping, prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            raise unknown_key_error(prefix, str(name), sorted(fields))
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}' ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        where = f"in '{prefix}': " if prefix else ""
        raise ConfigError(f"{where}{err}") from None


def unknown_key_error(prefix: str, name: str, valid: Sequence[str]) -> ConfigError:
    """The error for a key the schema does not have, naming the nearest valid one."""
    key = f"{prefix}.{name}" if prefix else name
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    where = f" in '{prefix}'" if prefix else ""
    return ConfigError(f"unknown key '{key}'{hint} (valid keys{where}: {', '.join(valid)})")


def from_dict(cls: type[T], data: Mapping) -> T:
    """Build the dataclass `cls` from a plain mapping, strictly."""
    return _from_mapping(cls, data, "")


# ---------------------------------------------------------------------------------------------------------------
# Overrides, loading, dumping


def parse_overrides(args: Sequence[str]) -> dict:
    """Turn `["--a.b", "3", "c.d=x"]` into `{"a": {"b": 3}, "c": {"d": "x"}}`; values are parsed as YAML."""
    result: dict = {}
    i = 0
    while i < len(args):
        token = args[i]
        if "=" in token:
            dotted, raw = token.split("=", 1)
        elif token.startswith("--") and i + 1 < len(args):
            dotted, raw = token, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"cannot read override {token!r}: use --section.key VALUE or section.key=VALUE")
        dotted = dotted.removeprefix("--")
        try:
            value = yaml.load(raw, Loader=_StrictLoader) if raw != "" else ""  # noqa: S506 - SafeLoader subclass
        except yaml.YAMLError:
            value = raw
        try:
            set_dotted(result, dotted, value)
        except ConfigError:
            raise ConfigError(f"override {dotted!r} conflicts with another override") from None
        i += 1
    return result


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, making the sections on the way (a missing or null one becomes a section)."""
    node = tree
    *sections, last = dotted.split(".")
    for part in sections:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"key {dotted!r}: {part} holds a value, not a section")
    node[last] = value


def merge(base: dict, override: Mapping) -> dict:
    """Recursively merge `override` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read `path` (may be None: defaults only), apply CLI overrides, build `cls` strictly."""
    data = read_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None


def to_dict(config: Any) -> dict:
    """A plain, YAML-safe dict of a config dataclass (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def dump_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML; `load_config` on this file gives an equal config."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
