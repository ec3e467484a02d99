"""Code a recipe names: `package.module:attribute`, `path/to/file.py:attribute`, or a plugin file or module.

    resolve("rewards.py:score", base_dir=recipe_dir, builtins=BUILTIN_REWARDS, where="reward 'score'", error=...)

One rule everywhere (rewards, environments, plugins that register objectives): a built-in name first, then a
module path, then a file path relative to the recipe's directory, else to the working directory. A file is
imported once per path (two names from one file share its globals); a file that fails to import is not kept. Errors
are one line naming what was looked for, where, and what exists, of the caller's error class.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any


def resolve(
    spec: str,
    *,
    base_dir: str | Path | None,
    builtins: Mapping[str, str],
    where: str,
    error: type[Exception],
    prefix: str = "posttrain_user",
) -> Any:
    """The object `spec` names: a key of `builtins` (-> its `module:attribute`), `package.module:attribute`, or
    `path/to/file.py:attribute`."""
    if spec in builtins:
        return import_attribute(builtins[spec], where=where, error=error, builtin=True)
    location, sep, attribute = spec.rpartition(":")
    if not sep or not location or not attribute:
        known = ", ".join(sorted(builtins))
        raise error(f"{where}: not a built-in name, 'package.module:name' or 'path/to/file.py:name'; "
                    f"built-ins: {known}")  # fmt: skip
    if location.endswith(".py") or "/" in location or "\\" in location:
        return attribute_of(import_file(location, base_dir=base_dir, where=where, error=error, prefix=prefix),
                            attribute, where=where, error=error)  # fmt: skip
    return import_attribute(spec, where=where, error=error)


def import_attribute(dotted: str, *, where: str, error: type[Exception], builtin: bool = False) -> Any:
    module_name, _, attribute = dotted.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if builtin and err.name == module_name:
            raise error(f"{where} lives in module {module_name}, which this installation lacks") from err
        raise error(f"{where}: cannot import module '{module_name}': {err}") from err
    return attribute_of(module, attribute, where=where, error=error)


def attribute_of(module: ModuleType, attribute: str, *, where: str, error: type[Exception]) -> Any:
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = sorted(name for name in vars(module) if not name.startswith("_"))
            raise error(f"{where}: {module.__name__} has no attribute '{attribute}'; it defines: "
                        f"{', '.join(public) or 'nothing public'}")  # fmt: skip
        target = getattr(target, part)
    return target


def find_file(location: str, base_dir: str | Path | None, *, where: str, error: type[Exception]) -> Path:
    """The file `location` names: absolute, else beside the recipe (`base_dir`), else in the working directory."""
    candidate = Path(location).expanduser()
    tried = [candidate] if candidate.is_absolute() else [*([Path(base_dir) / candidate] if base_dir else []),
                                                         Path.cwd() / candidate]  # fmt: skip
    for path in tried:
        if path.is_file():
            return path.resolve()
    raise error(f"{where}: file '{location}' not found (looked at {', '.join(str(p) for p in tried)})")


def import_file(
    location: str, *, base_dir: str | Path | None, where: str, error: type[Exception], prefix: str = "posttrain_user"
) -> ModuleType:
    """The module of a Python file, imported once per path and kept in sys.modules; not kept when it fails."""
    path = find_file(location, base_dir, where=where, error=error)
    name = f"{prefix}_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise error(f"{where}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise error(f"{where}: importing {path} failed: {type(err).__name__}: {err}") from err
    return module


def import_plugin(plugin: str, base_dir: str | Path | None, *, error: type[Exception]) -> ModuleType:
    """A plugin: a `.py` file (beside the recipe, else in the working directory) or an importable module, imported
    once; it registers its own objectives with the same decorators as the built-ins."""
    if plugin.endswith(".py"):
        return import_file(plugin, base_dir=base_dir, where=f"plugins: {plugin}", error=error,
                           prefix="posttrain_plugin")  # fmt: skip
    try:
        return importlib.import_module(plugin)
    except ImportError as err:
        raise error(f"plugins: cannot import module '{plugin}': {err}") from None
