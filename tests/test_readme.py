"""The README's quick starts run as printed (issue #20.1), so the README cannot drift from the code: every line of
its CLI quick start, in order, in a fresh directory holding the recipes, with short overrides appended (fewer steps
and rows), and its Python API block exactly as printed."""

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest

from posttrain.cli import main

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

SHORT = {  # appended after what the line says; later overrides win
    "sft": ["train.max_steps=2", "train.eval_every=0", "train.save_every=0", "data.task.train_size=64",
            "data.task.eval_size=4", "eval.limit=4"],
    "rl": ["train.max_steps=1", "train.save_every=0", "rl.prompts_per_step=2", "rl.group_size=2",
           "data.task.train_size=64", "data.task.eval_size=4", "eval.limit=4"],
    "pref": ["train.max_steps=1", "train.batch_size=8", "data.task.train_size=32", "data.task.eval_size=8",
             "eval.limit=4"],
    "rm": ["train.max_steps=2", "train.batch_size=8", "data.task.train_size=32", "data.task.eval_size=8",
           "eval.limit=4"],
    "eval": ["eval.limit=4"],
    "task": ["--train-size", "64", "--eval-size", "8"],
}  # fmt: skip
ONLINE = ["online.prompts_per_round=4", "train.batch_size=4"]


def section_block(title: str, language: str) -> str:
    section = README.split(f"## {title}", 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.DOTALL).group(1)


def cli_commands(title: str = "CLI quick start") -> list[list[str]]:
    """Each command of a section's bash block (a line's `&&` parts apart), comments dropped, as argv lists."""
    commands = []
    for line in section_block(title, "bash").splitlines():
        code = line.split("  #", 1)[0].strip()
        for part in filter(None, (p.strip() for p in code.split("&&"))):
            argv = shlex.split(part)
            assert argv[0] == "posttrain", part
            commands.append(argv[1:])
    return commands


def shortened(argv: list[str]) -> list[str]:
    command = argv[0]
    if "--help" in argv:
        return argv
    extra = SHORT.get(command, [])
    if command == "pref" and "online" in " ".join(argv):
        extra = [*extra, *ONLINE]
    return [*argv, *extra] if "--resume" not in argv else [*argv[:-1], *extra, "--resume"]


@pytest.fixture
def fresh_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_every_cli_line_of_the_readme_runs_as_printed(fresh_checkout: Path) -> None:
    commands = cli_commands()
    assert len(commands) >= 15 and any("model.path=runs/arith-sft/final" in " ".join(c) for c in commands)
    for argv in commands:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                code = main(shortened(argv))
            except SystemExit as stop:  # --help
                code = stop.code
        assert code == 0, f"posttrain {shlex.join(argv)} exited {code}:\n{out.getvalue()}"
    assert (fresh_checkout / "runs" / "mine" / "final" / "config.json").is_file()
    assert (fresh_checkout / "runs" / "lora" / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_every_line_of_the_agents_quick_start_runs_as_printed(fresh_checkout: Path) -> None:
    commands = cli_commands("Agents")
    assert [c[1] for c in commands] == ["recipes/arith-tools-sft.yaml", "recipes/arith-tools-grpo.yaml",
                                        "recipes/arith-tools-agent.yaml", "recipes/guess-number-sft.yaml",
                                        "recipes/guess-number-grpo.yaml"]  # fmt: skip
    for argv in commands:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(shortened(argv))
        assert code == 0, f"posttrain {shlex.join(argv)} exited {code}:\n{out.getvalue()}"
    for run in ("arith-tools-grpo", "arith-tools-agent", "guess-number-grpo"):
        assert (fresh_checkout / "runs" / run / "final" / "config.json").is_file()


@pytest.mark.slow
def test_the_python_api_block_of_the_readme_runs_as_printed(fresh_checkout: Path) -> None:
    code = section_block("Python API quick start", "python")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue().splitlines()
    assert printed[0].endswith(str(Path("runs/api/final"))) and 0.0 <= float(printed[1]) <= 1.0
