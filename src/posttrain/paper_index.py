"""docs/paper_index.md, generated from the code: `python -m posttrain.paper_index > docs/paper_index.md`.

Every built-in registered objective (advantages, policy losses, loss aggregations, KL estimators, preference
and reward-model losses), every built-in reward, and the plain functions in `PLAIN` (objectives chosen by a
config key rather than a registered name), each with what STYLE.md §8 asks of a method: the paper its
docstring cites, its registered name, the recipes in recipes/ that select it, and the tests in tests/ that
call it. tests/test_docs.py fails when docs/paper_index.md differs from `render()`, so the index cannot go
stale: a new objective, recipe or test changes it, and the commit that adds one regenerates it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config import PrefConfig, RLConfig, RMConfig, SFTConfig, validate
from posttrain.config.loading import read_recipe
from posttrain.config.pref import feedback_kind
from posttrain.objectives import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES
from posttrain.objectives.registry import REWARD_MODEL_LOSSES, Registry
from posttrain.rewards import BUILTIN_REWARDS

ROOT = Path(__file__).resolve().parents[2]
ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")
DEFAULT_SELECT = {"preference": "best_vs_worst", "unpaired": "threshold", "listwise": "all"}


@dataclass(frozen=True)
class Method:
    """One row: the function, the name a config gives it, and whether a validated recipe selects it."""

    name: str
    fn: Callable[..., Any]
    key: str
    selected: Callable[[Any], bool]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def _rewards(cfg: Any) -> list[str]:
    entries = [*(_get(cfg, "rewards") or []), *(_get(cfg, "online.rewards") or [])]
    return [entry.fn for entry in entries]


def _uses_kl(cfg: Any) -> bool:
    kl = _get(cfg, "rl.kl")
    return kl is not None and (kl.coef > 0 or kl.target is not None)


def _online_select(cfg: Any) -> str | None:
    online = _get(cfg, "online")
    if online is None:
        return None
    return online.select or DEFAULT_SELECT[feedback_kind(PREFERENCE_LOSSES[cfg.pref.loss])]


def _online_needs(cfg: Any) -> tuple[str, ...]:
    return PREFERENCE_LOSSES[cfg.pref.loss].needs if _get(cfg, "online") is not None else ()


def _registered(registry: Registry, key: str, selected: Callable[[Any, str], bool]) -> list[Method]:
    builtin = {name: fn for name, fn in registry.items() if fn.__module__.startswith("posttrain.")}
    return [Method(name, fn, f"`{key}`", lambda cfg, n=name: selected(cfg, n)) for name, fn in sorted(builtin.items())]


def _attribute(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


SECTIONS: list[tuple[str, Callable[[], list[Method]]]] = [
    ("Advantage estimators (`ADVANTAGES`, `rl.advantage`)", lambda: _registered(
        ADVANTAGES, "rl.advantage", lambda cfg, n: _get(cfg, "rl.advantage") == n)),
    ("Policy losses (`POLICY_LOSSES`, `rl.policy_loss`)", lambda: _registered(
        POLICY_LOSSES, "rl.policy_loss", lambda cfg, n: _get(cfg, "rl.policy_loss") == n)),
    ("Loss aggregation (`AGGREGATIONS`, `rl.loss_aggregation`)", lambda: _registered(
        AGGREGATIONS, "rl.loss_aggregation", lambda cfg, n: _get(cfg, "rl.loss_aggregation") == n)),
    ("KL estimators (`KL_ESTIMATORS`, `rl.kl.estimator`, with `rl.kl.coef` > 0)", lambda: _registered(
        KL_ESTIMATORS, "rl.kl.estimator", lambda cfg, n: _uses_kl(cfg) and _get(cfg, "rl.kl.estimator") == n)),
    ("Preference losses (`PREFERENCE_LOSSES`, `pref.loss`)", lambda: _registered(
        PREFERENCE_LOSSES, "pref.loss", lambda cfg, n: _get(cfg, "pref.loss") == n)),
    ("Reward-model losses (`REWARD_MODEL_LOSSES`, `rm.loss`)", lambda: _registered(
        REWARD_MODEL_LOSSES, "rm.loss", lambda cfg, n: _get(cfg, "rm.loss") == n)),
    ("Rewards (`BUILTIN_REWARDS`, `rewards[].fn`, `online.rewards[].fn`)", lambda: [
        Method(name, _attribute(target), "`rewards[].fn`", lambda cfg, n=name: n in _rewards(cfg))
        for name, target in sorted(BUILTIN_REWARDS.items())
    ]),
]  # fmt: skip

# Objectives that are plain functions chosen by a config key, not by a registered name.
# (module:function, the config that selects it, in markdown, whether a validated recipe does).
PLAIN: list[tuple[str, str, Callable[[Any], bool]]] = [
    ("posttrain.trainers.sft:train_sft", "`posttrain sft` (NLL, `token_mean` over the step; docs/sft.md)",
     lambda cfg: isinstance(cfg, SFTConfig)),
    ("posttrain.objectives.policy_losses:entropy_bonus", "`rl.entropy_coef` > 0",
     lambda cfg: (_get(cfg, "rl.entropy_coef") or 0) > 0),
    ("posttrain.objectives.kl:adaptive_kl_coef", "`rl.kl.target`",
     lambda cfg: _get(cfg, "rl.kl.target") is not None),
    ("posttrain.objectives.value:clipped_value_loss", "`rl.value.clip_range`, with an advantage that needs a critic",
     lambda cfg: _get(cfg, "rl") is not None and "critic" in ADVANTAGES[cfg.rl.advantage].needs),
    ("posttrain.objectives.value:lambda_returns", "an advantage that needs a critic (`gae`)",
     lambda cfg: _get(cfg, "rl") is not None and "critic" in ADVANTAGES[cfg.rl.advantage].needs),
    ("posttrain.rollout.groups:keep_informative_groups", "`rl.dynamic_sampling: true`",
     lambda cfg: bool(_get(cfg, "rl.dynamic_sampling"))),
    ("posttrain.rollout.groups:filtration_weights", "`rl.filtration`",
     lambda cfg: _get(cfg, "rl.filtration") is not None),
    ("posttrain.objectives.pairing:preference_matrix", "`online.rewards`",
     lambda cfg: bool(_get(cfg, "online.rewards"))),
    ("posttrain.objectives.pairing:win_rates_within_group", "`online:` with a loss that needs `win_rates`, or a judge",
     lambda cfg: _get(cfg, "online.judge") is not None
     or ("win_rates" in _online_needs(cfg) and "mixture_opponents" not in _online_needs(cfg))),
    ("posttrain.objectives.pairing:win_rates_against", "`online:` with a loss that needs `mixture_opponents`",
     lambda cfg: "mixture_opponents" in _online_needs(cfg)),
    ("posttrain.objectives.pairing:best_vs_worst", "`online.select: best_vs_worst`",
     lambda cfg: _online_select(cfg) == "best_vs_worst"),
    ("posttrain.objectives.pairing:all_pairs_above_margin", "`online.select: all_pairs`",
     lambda cfg: _online_select(cfg) == "all_pairs"),
    ("posttrain.objectives.pairing:statistical_rejection_sample", "`online.select: rso`",
     lambda cfg: _online_select(cfg) == "rso"),
    ("posttrain.objectives.pairing:top_k_labels", "`online.select: top_k`",
     lambda cfg: _online_select(cfg) == "top_k"),
    ("posttrain.objectives.pairing:threshold_labels", "`online.select: threshold`",
     lambda cfg: _online_select(cfg) == "threshold"),
    ("posttrain.objectives.reward_model:ensemble_score", "`rewards[].fn: ensemble`",
     lambda cfg: "ensemble" in _rewards(cfg)),
    ("posttrain.rewards.judges:closer_answer", "`online.judge.fn`",
     lambda cfg: str(_get(cfg, "online.judge.fn") or "").endswith(":closer_answer")),
]  # fmt: skip


def render(root: Path = ROOT) -> str:
    """The text of docs/paper_index.md for the repository at `root`."""
    recipes = _recipes(root)
    tests = _tests(root)
    docs = {path.name: path.read_text(encoding="utf-8") for path in sorted((root / "docs").glob("*.md"))}
    out = [_HEADER]
    gaps: dict[str, list[str]] = {"paper": [], "preset": [], "test": [], "docs": []}
    sections = [(title, methods()) for title, methods in SECTIONS]
    sections.append(("Plain functions chosen by a config key", [
        Method(target.partition(":")[2], _attribute(target), key, selected) for target, key, selected in PLAIN
    ]))  # fmt: skip
    for title, methods in sections:
        out += [f"## {title}", "", "| Method | Paper | Name | Selected by | Preset | Test | Docs |", "|" + "---|" * 7]
        for method in methods:
            row = _row(method, recipes, tests, docs)
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row[:-1]) + " |")
            for kind, missing in zip(("paper", "preset", "test", "docs"), row[-1]):
                if missing:
                    gaps[kind].append(f"`{method.name}`")
        out.append("")
    out += ["## Gaps", ""]
    out += ["Generated like the tables above: what each method lacks of the four, or of a docs section.", ""]
    out += [f"- **No arXiv paper in the docstring**: {', '.join(gaps['paper']) or 'none'}."]
    out += [f"- **No preset recipe selects it**: {', '.join(gaps['preset']) or 'none'}."]
    out += [f"- **No test calls it**: {', '.join(gaps['test']) or 'none'}."]
    out += [f"- **No docs section names it**: {', '.join(gaps['docs']) or 'none'}.", ""]
    return "\n".join(out)


_HEADER = """# Paper index

Generated by `python -m posttrain.paper_index > docs/paper_index.md`; `tests/test_docs.py` fails when this
file differs from what the code gives, so edit the docstrings, recipes or tests and regenerate it, never
this file. It lists every built-in method with the four things STYLE.md §8 asks of it:

- **Paper**: the citations with an arXiv id in the implementing function's docstring (its first
  sentence is the **Method** column); "none" where the docstring cites no arXiv paper.
- **Name**: the registered name (`posttrain list` prints them) or the plain function's name, and
  **Selected by**, the config key that chooses it.
- **Preset**: the recipes in `recipes/` whose validated config (after `inherit:`) selects it; "quotes the
  paper" where the recipe file or one it inherits from names the method's arXiv id.
- **Test**: the tests in `tests/` that call the function (by the name imported from posttrain) or, in
  `tests/objectives/` and `tests/rewards/`, name it by its registered name.
- **Docs**: the page and section whose heading (or table row) names it, else the section that first
  mentions it, marked "(mentioned)".
"""


def _row(
    method: Method, recipes: dict[str, tuple[Any, str]], tests: dict[str, set[str]], docs: dict[str, str]
) -> tuple[str, ...]:
    doc = inspect.getdoc(method.fn) or ""
    flat = " ".join(doc.split("\n\n")[0].split())
    ids = ARXIV.findall(doc)
    cited = _citations(" ".join(doc.split()))
    paper = "; ".join(cited) if cited else ("none" if not ids else ", ".join(f"arXiv:{i}" for i in ids))
    presets = []
    for recipe, (cfg, text) in recipes.items():
        if method.selected(cfg):
            quotes = any(f"arXiv:{i}" in text for i in ids)
            presets.append(f"`{recipe}`" + (" (quotes the paper)" if quotes else ""))
    names = {method.fn.__name__, getattr(method.fn, "name", method.name)}
    checked = sorted(t for t, refs in tests.items() if refs & names or f"'{method.name}'" in refs)
    section = _docs_section(method.name, docs)
    return (
        flat,
        paper,
        f"`{method.name}`",
        method.key,
        ", ".join(presets) or "none",
        _group_tests(checked) or "none",
        section,
        (not ids, not presets, not checked, section == "none"),
    )


def _citations(text: str) -> list[str]:
    """The parenthesised citations holding an arXiv id: "Rafailov et al. 2023, arXiv:2305.18290, Eq. 7"."""
    found = []
    for match in re.finditer(r"\(([^()]*arXiv:\d{4}\.\d{4,5}[^()]*)\)", text):
        found += [part.strip() for part in match.group(1).split(";") if "arXiv:" in part]
    return list(dict.fromkeys(found))


def _group_tests(checked: list[str]) -> str:
    by_file: dict[str, list[str]] = {}
    for test in checked:
        path, _, name = test.partition("::")
        by_file.setdefault(path, []).append(name)
    return "; ".join(f"`{path}`: " + ", ".join(f"`{n}`" for n in names) for path, names in by_file.items())


def _docs_section(name: str, docs: dict[str, str]) -> str:
    """The first heading that names `name` in backticks, else the heading above the first table row or
    paragraph that starts with it, else the heading above its first mention ("(mentioned)")."""
    pages = {page: text.splitlines() for page, text in docs.items() if page != "paper_index.md"}
    for page, lines in pages.items():
        for line in lines:
            if line.startswith("#") and f"`{name}`" in line:
                return f"{page} › {line.lstrip('#').strip()}"
    for page, lines in pages.items():
        heading = None
        for line in lines:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif heading and line.lstrip("|- ").startswith((f"`{name}`", f"`{name}(")):
                return f"{page} › {heading}"
    for page, lines in pages.items():
        heading = None
        for line in lines:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif heading and (f"`{name}`" in line or f"`{name}(" in line):
                return f"{page} › {heading} (mentioned)"
    return "none"


def _recipes(root: Path) -> dict[str, tuple[Any, str]]:
    """recipe file name -> (its validated config, the text of it and of the recipes it inherits from); the
    `*-base.yaml` recipes are what presets inherit, not presets."""
    out = {}
    for path in sorted((root / "recipes").glob("*.yaml")):
        if path.stem.endswith("-base"):
            continue
        raw = read_recipe(path)
        model = RLConfig if "rl" in raw else PrefConfig if "pref" in raw or "online" in raw else (
            RMConfig if "rm" in raw else SFTConfig
        )  # fmt: skip
        cfg = validate(model, {**raw, "recipe_dir": str(path.parent)})
        out[path.name] = (cfg, "".join(_inherited_texts(path)))
    return out


def _inherited_texts(path: Path) -> Iterator[str]:
    while path.is_file():
        text = path.read_text(encoding="utf-8")
        yield text
        parent = re.search(r"^inherit:\s*(\S+)", text, re.MULTILINE)
        if parent is None:
            return
        path = path.parent / parent.group(1)


def _tests(root: Path) -> dict[str, set[str]]:
    """`path::test` -> what the test references: names imported from posttrain that it uses (as `name` or
    `alias.name`), and, in the formula tests, its string constants quoted as `'text'`."""
    out = {}
    for path in sorted((root / "tests").rglob("test_*.py")):
        relative = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported, modules = _posttrain_imports(tree)
        strings = relative.startswith(("tests/objectives/", "tests/rewards/"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
                out[f"{relative}::{node.name}"] = _references(node, imported, modules, strings)
    return out


def _posttrain_imports(tree: ast.Module) -> tuple[dict[str, str], set[str]]:
    """(local name -> imported name, for names imported from posttrain modules; local names of posttrain
    modules themselves)."""
    names, modules = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("posttrain"):
            for alias in node.names:
                names[alias.asname or alias.name] = alias.name
                modules.add(alias.asname or alias.name)  # `from posttrain.objectives import preference as P`
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("posttrain"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    return names, modules


def _references(node: ast.AST, imported: dict[str, str], modules: set[str], strings: bool) -> set[str]:
    refs = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and child.id in imported:
            refs.add(imported[child.id])
        elif isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id in modules:
            refs.add(child.attr)
        elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("posttrain"):
            refs |= {alias.name for alias in child.names}  # imported inside the test
        elif strings and isinstance(child, ast.Constant) and isinstance(child.value, str):
            refs.add(f"'{child.value}'")
    return refs


if __name__ == "__main__":
    sys.stdout.write(render(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
