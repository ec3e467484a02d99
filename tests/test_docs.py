"""The docs against the code and TRL 1.16: no TRL class that 1.16 lacks is named as if it existed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# Trainers, configs and helpers that earlier TRL releases had and the trl==1.16.0 wheel does not
# (trl/__init__.py and trl/experimental/ list what it has; `test_trl_116_lacks_them` checks when TRL is installed).
GONE_FROM_TRL_116 = (
    "XPOTrainer", "XPOConfig", "NashMDTrainer", "NashMDConfig", "BCOTrainer", "BCOConfig",
    "GeometricMixtureWrapper", "PPOTrainer", "PPOConfig", "AdaptiveKLController",
)  # fmt: skip
SAYS_GONE = re.compile(r"before (TRL )?1\.16|removed|1\.16 has no|1\.16 does not have|not in (TRL )?1\.16")


def _texts() -> dict[str, str]:
    files = [*ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("src/posttrain/**/*.py")]
    return {str(f.relative_to(ROOT)): f.read_text(encoding="utf-8") for f in files}


def test_a_trl_class_that_1_16_lacks_is_never_named_as_if_it_existed():
    # each mention must have, within 300 characters, words saying that TRL 1.16 does not have it
    for path, text in _texts().items():
        for match in re.finditer("|".join(GONE_FROM_TRL_116), text):
            around = text[max(0, match.start() - 300) : match.end() + 300]
            assert SAYS_GONE.search(around), f"{path}: {match.group()} at {text[: match.start()].count(chr(10)) + 1}"


def test_trl_116_lacks_them():
    import importlib
    import pkgutil

    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"the list is of TRL 1.16.0, not {trl.__version__}")
    experimental = importlib.import_module("trl.experimental")
    found = pkgutil.iter_modules(experimental.__path__)
    modules = [trl, *(importlib.import_module(f"trl.experimental.{m.name}") for m in found)]
    names = {name for module in modules for name in dir(module)}
    assert not names & set(GONE_FROM_TRL_116)
    assert {"DPOTrainer", "KTOTrainer", "GRPOTrainer", "RewardTrainer", "CPOTrainer", "ORPOTrainer"} <= names


@pytest.fixture(scope="module")
def generated() -> str:
    from posttrain.paper_index import render

    return render(ROOT)


def test_paper_index_is_what_the_code_generates(generated: str):
    import difflib

    expected = generated
    actual = (ROOT / "docs" / "paper_index.md").read_text(encoding="utf-8")
    diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True), n=0))[:20])
    regenerate = "python -m posttrain.paper_index > docs/paper_index.md"
    assert actual == expected, f"docs/paper_index.md is stale; run {regenerate}\n{diff}"


def test_paper_index_rows_come_from_the_registries_recipes_and_tests(generated: str):
    from posttrain.objectives.registry import ALL_REGISTRIES
    from posttrain.rewards import BUILTIN_REWARDS

    rows = {line.split(" | ")[2].strip("`"): line for line in generated.splitlines() if line.count(" | ") >= 6}
    builtin = {n for r in ALL_REGISTRIES.values() for n, fn in r.items() if fn.__module__.startswith("posttrain.")}
    assert builtin | set(BUILTIN_REWARDS) <= set(rows)
    # DAPO: its dynamic sampling has unit tests, and its preset selects the overlong penalty, quoting the paper
    assert "tests/trainers/test_rl_parts.py" in rows["keep_informative_groups"]
    assert "`arith-dapo.yaml` (quotes the paper)" in rows["overlong_penalty"]
    assert "tests/rewards/test_shaping.py`: " in rows["overlong_penalty"]
    assert "arXiv:2503.14476" in rows["overlong_penalty"]
