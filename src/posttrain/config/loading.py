"""YAML recipes, dotted command-line overrides, and one-line validation errors.

    posttrain sft recipes/arith-sft.yaml train.lr=3e-4 model.path=/x

A recipe may start from another with `inherit: other.yaml` (a path relative to the recipe); keys in the
recipe, then overrides on the command line, replace what they name. A key that names the same thing another
way replaces that other key too (`REPLACES`): `model.path=/my/model` on a recipe with `model.preset` trains
/my/model, and takes its tokenizer when the directory has one. What was replaced is said in the config's
`load_notes`, which every run prints first.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.errors import PosttrainError
from posttrain.runtime.model_files import holds_tokenizer

M = TypeVar("M", bound=BaseModel)


class ConfigError(PosttrainError, ValueError):
    """A recipe or override that does not fit the config: names the key, the value and what is allowed."""


REPLACES: dict[str, tuple[str, ...]] = {
    "model.path": ("model.preset",), "model.preset": ("model.path",),
    "train.epochs": ("train.max_steps",), "train.max_steps": ("train.epochs",),
}  # fmt: skip
"""Keys that name one thing two ways (exactly one may be set): setting one replaces the other."""


def load_config(
    model: type[M], recipe: str | Path | dict[str, Any] | None = None, overrides: Sequence[str] = ()
) -> M:
    """Validate `recipe` (a YAML path, or a mapping already read) plus `key.sub=value` overrides into a `model`
    instance. Each override replaces what it names and the keys it replaces (`REPLACES`); see the module
    docstring."""
    if isinstance(recipe, dict):
        raw = copy.deepcopy(recipe)
    else:
        raw = read_recipe(recipe) if recipe else {}
        if recipe:
            raw.setdefault("recipe_dir", str(Path(recipe).resolve().parent))
    parsed = [parse_override(override) for override in overrides]
    notes = apply_overrides(raw, parsed, recipe_dir=raw.get("recipe_dir"))
    raw["load_notes"] = [*raw.get("load_notes", ()), *notes]
    return validate(model, raw)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[tuple[str, Any]], *, recipe_dir: str | None) -> list[str]:
    """Set each (dotted key, value) in `raw`, dropping the recipe's values of the keys it replaces; returns notes
    saying what was replaced."""
    keys = {key for key, _ in overrides}
    recipe_model = copy.deepcopy(raw.get("model"))
    notes = [_drop_replaced(raw, key, keys, "the override") for key, _ in overrides]
    for key, value in overrides:
        set_dotted(raw, key, value)
    notes.append(_tokenizer_of_new_model(raw, recipe_model, keys, recipe_dir))
    return [note for note in notes if note]


def _drop_replaced(raw: dict[str, Any], key: str, setting: set[str], by: str) -> str | None:
    replaced = [(other, pop_dotted(raw, other)) for other in REPLACES.get(key, ()) if other not in setting]
    shown = [f"{other}={value}" for other, value in replaced if value is not None]
    return f"{key} ({by}) replaces the recipe's {', '.join(shown)}" if shown else None


def _tokenizer_of_new_model(
    raw: dict[str, Any], recipe_model: Any, setting: set[str], recipe_dir: str | None
) -> str | None:
    """A recipe's model.tokenizer belongs to the recipe's model: when an override names another model directory
    that holds a tokenizer of its own, that tokenizer is used (an override of model.tokenizer wins over both)."""
    model = raw.get("model")
    if not isinstance(model, dict) or "model.tokenizer" in setting or "model.path" not in setting:
        return None
    tokenizer, path = model.get("tokenizer"), model.get("path")
    recipe_path = recipe_model.get("path") if isinstance(recipe_model, dict) else None
    if tokenizer is None or not isinstance(path, str) or path == recipe_path or not _holds_tokenizer(path, recipe_dir):
        return None
    del model["tokenizer"]
    return f"model.tokenizer: the tokenizer of model.path={path} replaces the recipe's model.tokenizer={tokenizer}"


def _holds_tokenizer(path: str, recipe_dir: str | None) -> bool:
    """Whether a directory (relative to the working directory, else to the recipe's) holds tokenizer files."""
    for base in (Path.cwd(), *([Path(recipe_dir)] if recipe_dir else [])):
        directory = base / Path(path).expanduser()
        if directory.is_dir():
            return holds_tokenizer(directory)
    return False


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
    setting = set(dotted_keys(raw))
    for key in setting:
        _drop_replaced(base, key, setting, f"recipe {path.name}")
    return merge(base, raw)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def dotted_keys(raw: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key of a nested mapping, dotted, sections and leaves alike (`model`, `model.path`, ...)."""
    keys = []
    for key, value in raw.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like key.sub=value (e.g. train.lr=3e-4)")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def pop_dotted(raw: dict[str, Any], key: str) -> Any:
    """Remove a dotted key from a nested mapping; its value, or None where it was not set."""
    *parents, leaf = key.split(".")
    node: Any = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return node.pop(leaf, None) if isinstance(node, dict) else None


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
