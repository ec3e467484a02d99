"""YAML recipes, dotted command-line overrides, and one-line validation errors.

    posttrain sft recipes/arith-sft.yaml train.lr=3e-4 model.path=/x

A recipe may start from another with `inherit: other.yaml` (a path relative to the recipe); keys in the
recipe, then overrides on the command line, replace what they name.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.errors import PosttrainError

M = TypeVar("M", bound=BaseModel)


class ConfigError(PosttrainError, ValueError):
    """A recipe or override that does not fit the config: names the key, the value and what is allowed."""


def load_config(model: type[M], recipe: str | Path | None = None, overrides: list[str] = ()) -> M:
    """Validate `recipe` (YAML) plus `key.sub=value` overrides into a `model` instance."""
    raw: dict[str, Any] = read_recipe(recipe) if recipe else {}
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    if recipe:
        raw.setdefault("recipe_dir", str(Path(recipe).resolve().parent))
    return validate(model, raw)


def validate(model: type[M], raw: dict[str, Any]) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, model)) from None


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a directory; give the recipe's YAML file")
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path}: 'inherit' loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {path} is not valid YAML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {error.start + 1}); save it as UTF-8") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values, got {type(raw).__name__}")
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    base = read_recipe(path.parent / parent, (*_seen, path.resolve()))
    return merge(base, raw)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like key.sub=value (e.g. train.lr=3e-4)")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: '{'.'.join(parents[: i + 1])}' is a value, not a section")
        node = child
    node[leaf] = value


def format_validation_error(error: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(model, item["loc"][:-1])) or "none"
            lines.append(f"{loc}: unknown key; allowed here: {allowed}")
        elif item["type"] == "missing":
            lines.append(f"{loc}: required")
        else:
            value = item.get("input")
            shown = f" (got {value!r})" if not isinstance(value, dict) else ""
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{loc or 'config'}: {message}{shown}")
    return "; ".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        sub = (
            _model_of(current.model_fields[part].annotation)
            if _is_model(current) and part in current.model_fields
            else None
        )
        if sub is None:
            return []
        current = sub
    return _public_fields(current) if _is_model(current) else []


def _public_fields(model: type[BaseModel]) -> list[str]:
    return [name for name, field in model.model_fields.items() if not field.exclude]


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if _is_model(annotation):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def describe_options(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every leaf option, for `--help`."""
    rows = []
    for name in _public_fields(model):
        field = model.model_fields[name]
        key = f"{prefix}{name}"
        sub = _model_of(field.annotation)
        if sub is not None and (field.is_required() or field.default is not None):
            rows.extend(describe_options(sub, prefix=f"{key}."))
            continue
        if sub is not None:  # an optional section, off by default
            keys = ", ".join(_public_fields(sub))
            rows.append((key, "null", (field.description or "").strip() + f" (a section: {keys})"))
            continue
        default = "required" if field.is_required() else _show(field.get_default(call_default_factory=True))
        rows.append((key, default, (field.description or "").strip()))
    return rows


def _show(value: Any) -> str:
    value = _plain_value(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _plain_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list | tuple):
        return [_plain_value(v) for v in value]
    return value
