"""docs/from-trl.md cannot drift (issue #25.5): every field of TRL 1.16's SFT, DPO, GRPO, RLOO, KTO and Reward configs
(TrainingArguments' included) is listed exactly once for its config, and no field a config lacks (when TRL is
installed); every posttrain key the page names exists in the posttrain config of that trainer, every `key=value` it
names loads, and every flag exists (always)."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from posttrain.cli import _section_of, build_parser
from posttrain.config import PrefConfig, RLConfig, RMConfig, SFTConfig, load_config

PAGE = (Path(__file__).parents[1] / "docs" / "from-trl.md").read_text(encoding="utf-8")
TRL_CONFIGS = ("SFTConfig", "DPOConfig", "GRPOConfig", "RLOOConfig", "KTOConfig", "RewardConfig")
POSTTRAIN = {"SFTConfig": SFTConfig, "DPOConfig": PrefConfig, "KTOConfig": PrefConfig, "GRPOConfig": RLConfig,
             "RLOOConfig": RLConfig, "RewardConfig": RMConfig}  # fmt: skip
WORDS = ("missing", "built in", "not needed")
"""What the posttrain column says when it names no key."""
DICT_ARGUMENTS = {"pref.loss_args": "preference_losses", "rl.advantage_args": "advantages",
                  "rl.policy_loss_args": "policy_losses", "rm.loss_args": "reward_model_losses"}  # fmt: skip
"""A key below one of these is a keyword of some function of that registry."""
BASES = {"online.": {"online": {"rewards": [{"fn": "numeric_match"}]}}}
"""What a `key=value` under these prefixes needs beside it to load."""


def sections() -> list[tuple[str, tuple[str, ...], list[tuple[str, str, str]]]]:
    """(title, the TRL configs it covers, rows (option, posttrain, note)) of every `## ` section with a table."""
    out = []
    for block in PAGE.split("\n## ")[1:]:
        title, _, body = block.partition("\n")
        rows = []
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| `") and len(cells) == 3:
                rows.append((cells[0].strip("`"), cells[1], cells[2]))
        covers = TRL_CONFIGS if title == "TrainingArguments" else tuple(re.findall(r"\b\w+Config\b", title))
        assert covers and set(covers) <= set(TRL_CONFIGS), title
        out.append((title, covers, rows))
    return out


def listed(config: str) -> list[str]:
    return [option for _, covers, rows in sections() if config in covers for option, _, _ in rows]


def test_every_section_has_rows_and_a_config_lists_each_option_once() -> None:
    assert next(title for title, _, _ in sections()) == "TrainingArguments"
    for title, _, rows in sections():
        assert rows, title
    for config in TRL_CONFIGS:
        options = listed(config)
        doubled = sorted({o for o in options if options.count(o) > 1})
        assert not doubled, f"{config}: listed twice: {doubled}"
    assert len(listed("GRPOConfig")) > 150  # TrainingArguments' 114 and GRPO's own


def test_the_page_lists_exactly_trls_fields() -> None:
    import dataclasses

    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"the page maps TRL 1.16.0, not {trl.__version__}")
    for config in TRL_CONFIGS:
        fields = {f.name for f in dataclasses.fields(getattr(trl, config))}
        options = set(listed(config))
        assert not fields - options, f"{config}: not on the page: {sorted(fields - options)}"
        assert not options - fields, f"{config}: on the page but not a field: {sorted(options - fields)}"


def items(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def key_exists(model: type, key: str) -> bool:
    """Whether a dotted key (`rewards[].weight`, `rl.policy_loss_args.clip_low`) names an option of the config."""
    for prefix, registry in DICT_ARGUMENTS.items():
        if key.startswith(prefix + "."):
            import posttrain.objectives.registry as objectives
            from posttrain.api import registered

            table = {**objectives.ALL_REGISTRIES}
            argument = key.removeprefix(prefix + ".")
            assert registry in registered()
            return key_exists(model, prefix) and any(argument in _keywords(fn) for fn in table[registry].values())
    node: typing.Any = model
    for part in key.split("."):
        section = _section_of(node)
        name = part.removesuffix("[]")
        if section is None or name not in section.model_fields:
            return False
        node = section.model_fields[name].annotation
        if part.endswith("[]"):
            node = typing.get_args(node)[0]
    return True


def _keywords(fn: typing.Any) -> set[str]:
    import inspect

    return {p for p, v in inspect.signature(fn).parameters.items() if v.kind is v.KEYWORD_ONLY}


def flags() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {flag for p in sub.choices.values() for a in p._actions for flag in a.option_strings}


def check_item(model: type, item: str, where: str) -> None:
    if item.startswith("--"):
        assert item in flags(), f"{where}: {item} is no flag of any command"
        return
    key, sep, _ = item.partition("=")
    assert key_exists(model, key), f"{where}: {key} is not a key of {model.__name__}"
    if sep:
        base = next((b for prefix, b in BASES.items() if key.startswith(prefix)), {})
        load_config(model, base, [item])  # raises ConfigError if the value does not fit


def test_every_posttrain_key_named_exists_and_every_setting_loads() -> None:

    for title, covers, rows in sections():
        for option, ours, note in rows:
            where = f"docs/from-trl.md, {title}, {option}"
            assert ours.startswith("`") or ours.startswith(WORDS), f"{where}: {ours!r}"
            if ours.startswith(WORDS):
                assert note, f"{where}: {ours} needs a reason"
            named = items(ours) + [i for i in items(note) if "=" in i and re.match(r"^[a-z_]+\.[a-z_.]+=", i)]
            for config in covers:
                for item in named:
                    check_item(POSTTRAIN[config], item, where)


def test_the_check_catches_a_wrong_key() -> None:
    assert not key_exists(RLConfig, "rl.kl.coeff") and key_exists(RLConfig, "rewards[].weight")
    assert not key_exists(PrefConfig, "pref.loss_args.not_a_keyword")
    assert key_exists(PrefConfig, "pref.loss_args.lam_d")
    with pytest.raises(Exception, match=r"rl\.policy_loss: 'gspo2' is not a registered"):
        check_item(RLConfig, "rl.policy_loss=gspo2", "test")
