"""Reading and writing job configs: YAML recipes, `--set` overrides, typed conversion.

Every value passes through `_convert`, which knows the dataclass field's type, so a
wrong key or a wrong type is reported with its dotted name and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import yaml

from sparsetron.model.config import ConfigError
from sparsetron.train.config import JobConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"


def recipe_names() -> list[str]:
    """Names of the recipes shipped in configs/."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A shipped recipe's file for a bare name, else the given path (which must exist)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"'{name_or_path}' is neither a config file nor a shipped recipe; recipes: {', '.join(recipe_names())}"
    )


def load_job_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a recipe (or the defaults), apply `section.key=value` overrides, validate once."""
    raw: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_recipe(name_or_path)
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if raw is None:
            # Training the defaults into runs/default is never what an empty file meant.
            raise ConfigError(
                f"{path}: the file is empty (or only comments); a recipe holds sections such as "
                "'trainer: {run_dir: runs/mine}' (or name a shipped recipe)"
            )
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    job = from_dict(JobConfig, raw, "")
    job.validate()
    return job


def apply_override(raw: dict, item: str) -> None:
    """Set `section.key=value` in a raw config mapping; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{item}' must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': value is not valid YAML: {err}") from err
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:  # absent, or an empty `section:` line in the YAML
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': {part} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = prefix or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        names = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
        raise ConfigError(f"unknown key {names}; allowed in {where}: {', '.join(fields)}")
    kwargs = {name: _convert(hints[name], value, _join(prefix, name)) for name, value in raw.items()}
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        # The first alternative that takes the value (`int | float` keeps 30 an int); else the last one's error.
        *firsts, last = [a for a in args if a is not type(None)]
        for inner in firsts:
            try:
                return _convert(inner, value, key)
            except ConfigError:
                pass
        return _convert(last, value, key)
    if origin is tuple:
        # A fixed-length row such as [weight, source]; kept a list so YAML dumps it plainly.
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return [_convert(inner, v, f"{key}[{i}]") for i, (inner, v) in enumerate(zip(args, value, strict=True))]
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _yaml11_float(value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: config type {hint!r} is not supported")


def _yaml11_float(text: str, key: str) -> float:
    """YAML 1.1 reads `1e-3` (no dot) as a string; a float field takes it as the number it spells."""
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {text!r}") from None


def to_dict(job: Any) -> dict:
    """A plain mapping of a config dataclass (what YAML holds)."""
    return dataclasses.asdict(job)


def dump_yaml(job: Any) -> str:
    return yaml.safe_dump(to_dict(job), sort_keys=False)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs


def describe(cls: type = JobConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field, for `sparsetron config --doc`."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], key))
        else:
            rows.append((key, repr(getattr(defaults, f.name)), docs.get(f.name, "")))
    return rows
