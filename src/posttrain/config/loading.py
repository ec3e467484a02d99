"""YAML recipes, dotted command-line overrides, and one-line validation errors.

    posttrain sft recipes/arith-sft.yaml train.lr=3e-4 model.path=/x

A recipe may start from another with `inherit: other.yaml` (a path relative to the recipe); keys in the
recipe, then overrides on the command line, replace what they name. A key that names the same thing another
way replaces that other key too (`REPLACES`): `model.path=/my/model` on a recipe with `model.preset` trains
/my/model, and takes its tokenizer when the directory has one. What was replaced is said in the config's
`load_notes`, which every run prints first.

Recipes and override values are read by `load_yaml`, which refuses what would exhaust memory or the stack
before any value is built (docs/reliability.md): a recipe over `MAX_RECIPE_BYTES`, nesting deeper than
`MAX_NESTING`, aliases that expand the document past `MAX_EXPANSION` (a "billion laughs"), an alias inside the
node it names, and strings that are not Unicode (a lone surrogate written as `"\\ud800"`). Error messages
show at most a few dozen characters of any value.
"""

from __future__ import annotations

import copy
import re
import reprlib
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


MAX_RECIPE_BYTES = 2**20
"""The largest recipe file: recipes hold settings (a few kB), not data."""
MAX_NESTING = 64
"""The deepest nesting of mappings and lists in a recipe or an override value."""
MAX_EXPANSION = 100_000
"""How much aliases may add to a document, counting each node once and each character of a scalar once
wherever an alias repeats it, beyond twice the text's length."""

SURROGATE = re.compile("[\ud800-\udfff]")
SHOWN = reprlib.Repr()
SHOWN.maxstring, SHOWN.maxother, SHOWN.maxlevel = 60, 60, 3


class ConfigError(PosttrainError, ValueError):
    """A recipe or override that does not fit the config: names the key, the value and what is allowed."""


class RefusedYAML(yaml.YAMLError):
    """YAML that `load_yaml` refuses to build; `line` is 1-based, or None where not known."""

    def __init__(self, message: str, mark: Any = None):
        super().__init__(message)
        self.message, self.line = message, None if mark is None else mark.line + 1


class UnbuildableValue(RefusedYAML):
    """A scalar that PyYAML cannot build: `!!int ""` raised IndexError, `!!bool x` KeyError, 2020-13-45 and ints of
    more than 4,300 digits ValueError."""


class BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses deep nesting while composing (PyYAML composes recursively, so it raised
    RecursionError), and an expanding, self-containing or non-Unicode document before constructing it."""

    def __init__(self, text: str):
        super().__init__(text)
        self.depth, self.expansion_limit = 0, 2 * len(text) + MAX_EXPANSION

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                mark = self.peek_event().start_mark
                raise RefusedYAML(f"mappings and lists nested more than {MAX_NESTING} deep", mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node: Any) -> Any:
        check_node_graph(node, self.expansion_limit)
        return super().construct_document(node)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, LookupError, AttributeError, TypeError) as error:
            message = f"a value cannot be read ({type(error).__name__}: {str(error)[:200]})"
            raise UnbuildableValue(message, node.start_mark) from None


def load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)` within the bounds of the module docstring. Raises yaml.YAMLError: RefusedYAML for
    those bounds, UnbuildableValue for a scalar Python cannot build."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def check_node_graph(root: Any, limit: int) -> None:
    """Walk the composed nodes once (an alias is the node it names, reached again), without recursion: the size of
    the document with every alias expanded (nodes plus scalar characters) must stay within `limit`, its depth
    within MAX_NESTING; no node may contain itself; scalars must be Unicode."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, depth)
    walking: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = _child_nodes(node)
        if finished:
            size = min(limit + 1, 1 + sum(done[id(child)][0] for child in children))
            size += len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            depth = 1 + max((done[id(child)][1] for child in children), default=0)
            if size > limit:
                raise RefusedYAML(f"aliases expand the document past {limit:,} nodes and characters "
                                  "(a YAML bomb); write the values out, or repeat them less", node.start_mark)
            if depth > MAX_NESTING:
                raise RefusedYAML(f"mappings and lists nested more than {MAX_NESTING} deep (through aliases)",
                                  node.start_mark)
            done[id(node)] = (size, depth)
            walking.discard(id(node))
        elif id(node) in walking:
            raise RefusedYAML("an alias inside the node it names: a value that contains itself", node.start_mark)
        elif id(node) not in done:
            if isinstance(node, yaml.ScalarNode) and (found := SURROGATE.search(node.value)):
                raise RefusedYAML(f"lone surrogate U+{ord(found.group()):04X} (a \\u escape of half a UTF-16 pair) "
                                  "is not Unicode text; write the whole character", node.start_mark)
            walking.add(id(node))
            stack.append((node, True))
            stack += [(child, False) for child in children]


def _child_nodes(node: Any) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


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
    except UnicodeEncodeError:  # a validator's message held a lone surrogate, which pydantic-core cannot encode
        key, value = _first_surrogate(raw)
        raise ConfigError(f"{key}: {show(value)} holds a lone surrogate (a byte that is not UTF-8 in the command "
                          "line, or half of a UTF-16 pair), which is not Unicode text") from None


def _first_surrogate(raw: Any) -> tuple[str, Any]:
    """(dotted key, value) of the first string in `raw` that holds a surrogate, keys included."""
    stack: list[tuple[str, Any]] = [("config", raw)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, str) and SURROGATE.search(value):
            return key, value
        if isinstance(value, dict):
            stack += [(f"{key}.{name}".removeprefix("config."), item) for name, item in value.items()]
            stack += [(key, name) for name in value]
        elif isinstance(value, list):
            stack += [(f"{key}[{i}]", item) for i, item in enumerate(value)]
    return "config", raw


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a directory; give the recipe's YAML file")
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path}: 'inherit' loops back to itself")
    with path.open("rb") as handle:
        data = handle.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {path} is larger than {MAX_RECIPE_BYTES // 2**20} MiB; a recipe holds settings, "
                          "not data: give data files as data.train / data.eval")
    try:
        raw = load_yaml(data.decode("utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {error.start + 1}); save it as UTF-8") from None
    except RefusedYAML as error:
        raise ConfigError(f"recipe {path} line {error.line}: {error.message}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {path} is not valid YAML: {one_line(' '.join(str(error).split()))}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values, got {type(raw).__name__}")
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"recipe {path}: inherit: expected the path of a recipe, got {show(parent)}")
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
        parsed = load_yaml(value) if value != "" else ""
    except UnbuildableValue:  # 2020-13-45: the text itself
        parsed = value
    except RefusedYAML as error:
        raise ConfigError(f"override {show(text)}: {error.message}") from None
    except yaml.YAMLError:  # not YAML: the text itself
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


def format_validation_error(error: ValidationError, model: type[BaseModel], shown_errors: int = 10) -> str:
    """One line for all of the errors (the first `shown_errors`), each cut to a few hundred characters: a message
    a validator wrote may hold the value it refused, and that value may hold line breaks or megabytes."""
    lines = []
    errors = error.errors()
    for item in errors[:shown_errors]:
        loc = ".".join(show(part)[1:-1] if isinstance(part, str) else str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(model, item["loc"][:-1])) or "none"
            lines.append(f"{loc}: unknown key; allowed here: {allowed}")
        elif item["type"] == "missing":
            lines.append(f"{loc}: required")
        else:
            value = item.get("input")
            shown = f" (got {show(value)})" if not isinstance(value, dict) else ""
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{loc or 'config'}: {message}{shown}")
    if len(errors) > shown_errors:
        lines.append(f"and {len(errors) - shown_errors} more errors")
    return "; ".join(one_line(line) for line in lines)


def one_line(text: str, limit: int = 600) -> str:
    """`text` with its line breaks written as `\\n`, its middle cut out when longer than `limit`."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


def show(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, built without visiting more of `value` than is shown."""
    text = SHOWN.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
