"""The bad-input matrix (issue #6): each bad file, row, model path or config value makes the CLI exit 2
with one line naming what is wrong and where, then the --debug hint, and no traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.tasks import build_builtin_tokenizer

TINY = ["model.preset=qwen2-tiny", "model.tokenizer=arithmetic", "train.max_steps=1", "train.batch_size=2"]
GOOD = {"prompt": "1+1=", "completion": "2"}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad")

    def jsonl(name: str, *rows: object) -> None:
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("good.jsonl", GOOD, {"prompt": "2+2=", "completion": "4"})
    (d / "empty.jsonl").write_text("\n")
    jsonl("fields.jsonl", {"question": "1+1=", "response": "2"})
    jsonl("types.jsonl", GOOD, {"prompt": 7, "completion": "2"})
    jsonl("empty_string.jsonl", {"prompt": "1+1=", "completion": " "})
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "2"}\n')
    jsonl("role.jsonl", {"messages": [user("1+1="), {"role": "bot", "content": "2"}]})
    jsonl("order.jsonl", {"messages": [user("1+1="), assistant("2"), assistant("3")]})
    jsonl("chat.jsonl", {"messages": [user("1+1="), assistant("2")]})
    jsonl("long.jsonl", GOOD, {"prompt": "1+1=", "completion": "2" * 100})
    jsonl("long_prompt.jsonl", {"prompt": "1+1=" * 50, "completion": "2"})
    (d / "not_a_model").mkdir()
    (d / "not_a_model" / "notes.txt").write_text("x")
    untemplated = build_builtin_tokenizer("arithmetic")
    untemplated.chat_template = None
    untemplated.save_pretrained(d / "no_template")
    return d


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert lines[-1] == "(run again with --debug for the traceback)"
    assert lines[-2].startswith("error: "), err
    for word in words:
        assert word in lines[-2], (word, lines[-2])


DATA_CASES = [
    # (file, extra overrides, words the error line must hold besides the file name)
    ("missing.jsonl", [], ["no such file or directory"]),
    ("empty.jsonl", [], ["the dataset is empty"]),
    (
        "fields.jsonl",
        [],
        ["line 1: fields found: ['question', 'response']; expected 'prompt' + 'completion', or 'messages'"],
    ),
    ("types.jsonl", [], ["line 2: field 'prompt': expected text or a non-empty list of messages, found int 7"]),
    ("empty_string.jsonl", [], ["line 1: field 'completion': empty text"]),
    ("latin1.jsonl", [], ["line 1: bytes are not UTF-8"]),
    ("role.jsonl", [], ["line 1: field 'messages[1]': unknown role 'bot'; allowed: system, user, assistant, tool"]),
    ("order.jsonl", [], ["line 1: field 'messages'", "two assistant turns in a row"]),
    ("chat.jsonl", ["model.tokenizer={no_template}"], ["line 1: the row is conversational but the tokenizer has no"]),
    (
        "long_prompt.jsonl",
        ["data.max_length=32"],
        ["no training examples are left", "1 rows, 0 skipped, 0 truncated, 1 dropped", "data.max_length"],
    ),
    ("types.jsonl", ["data.on_bad_row=skip", "train.batch_size=1"], []),  # one good row left: runs (below)
]


@pytest.mark.parametrize(("name", "extra", "words"), DATA_CASES[:-1], ids=[c[0] for c in DATA_CASES[:-1]])
def test_bad_data_is_one_line_naming_file_row_and_field(name, extra, words, files, tmp_path, capsys):
    extra = [x.format(no_template=files / "no_template") for x in extra]
    argv = ["sft", *TINY, f"data.train={files / name}", f"output_dir={tmp_path}", *extra]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, *words)
    if name != "long_prompt.jsonl":
        assert str(files / name) in err


def test_unreadable_file(files, tmp_path, capsys, monkeypatch):
    path = tmp_path / "secret.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make this one file refuse as the OS would
        real = Path.open

        def denied(self: Path, *args: object, **kwargs: object) -> object:
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", denied)
    code, err = run_cli(["sft", *TINY, f"data.train={path}", f"output_dir={tmp_path}"], capsys)
    assert_one_line_error(code, err, f"{path}: cannot read it (Permission denied)")


@pytest.mark.parametrize(
    ("truncation", "counts"), [("truncate", "1 truncated, 0 dropped"), ("drop", "0 truncated, 1 dropped")]
)
def test_over_long_rows_are_truncated_or_dropped_and_counted(truncation, counts, files, tmp_path, capsys):
    argv = ["sft", *TINY, f"data.train={files / 'long.jsonl'}", "data.max_length=32", f"data.truncation={truncation}"]
    code, err = run_cli([*argv, f"output_dir={tmp_path}"], capsys)
    assert code == 0, err
    assert f"data: {files / 'long.jsonl'}: 2 rows, 0 skipped, {counts}" in " ".join(err.split())  # rich wraps


def test_skipped_rows_are_counted_and_the_run_goes_on(files, tmp_path, capsys):
    name, extra, _ = DATA_CASES[-1]
    code, err = run_cli(["sft", *TINY, f"data.train={files / name}", f"output_dir={tmp_path}", *extra], capsys)
    assert code == 0, err
    assert f"data: {files / name}: 2 rows, 1 skipped (wrong type: 1), 0 truncated, 0 dropped" in " ".join(err.split())


MODEL_CASES = [
    # (overrides, words)
    (["model.path={d}/no_such_model"], ["model.path: ", "no_such_model does not exist"]),
    (["model.path={d}/not_a_model"], ["model.path: ", "not_a_model has no config.json"]),
    (["model.path={d}/good.jsonl"], ["model.path: ", "good.jsonl is a file, not a model directory"]),
    (["model.preset=qwen2-tiny", "model.tokenizer={d}/no_such_tokenizer"], ["model.tokenizer: ", "does not exist"]),
    (["model.preset=qwen2-tiny", "model.tokenizer={d}/not_a_model"], ["model.tokenizer: ", "holds no tokenizer"]),
    (["model.preset=qwen2-huge", "model.tokenizer=arithmetic"], ["model.preset: 'qwen2-huge' is not a preset"]),
]


@pytest.mark.parametrize("command", ["sft", "rm"])
@pytest.mark.parametrize(("overrides", "words"), MODEL_CASES, ids=range(len(MODEL_CASES)))
def test_bad_model_or_tokenizer_path(command, overrides, words, files, tmp_path, capsys):
    model = [x.format(d=files) for x in overrides]
    data = f"data.train={files / 'good.jsonl'}" if command == "sft" else "data.task.name=arithmetic"
    code, err = run_cli([command, *model, data, "train.max_steps=1", f"output_dir={tmp_path}"], capsys)
    assert_one_line_error(code, err, *words)


CONFIG_CASES = [
    # (command, overrides, words)
    ("sft", ["train.lrr=0.1"], ["train.lrr: unknown key; allowed here: max_steps, lr,"]),
    ("sft", ["optimizer.lr=0.1"], ["optimizer: unknown key"]),
    ("sft", ["train.lr=-1"], ["train.lr: Input should be greater than 0 (got -1)"]),
    ("sft", ["train.max_bad_steps=0"], ["train.max_bad_steps: Input should be greater than 0"]),
    ("sft", ["data.truncation=cut"], ["data.truncation:", "'truncate' or 'drop'"]),
    ("rl", ["rl.group_size=1"], ["rl.group_size: Input should be greater than or equal to 2 (got 1)"]),
    ("rl", ["rl.advantage=grpo_std"], ["rl.advantage: 'grpo_std' is not a registered"]),
    ("rl", ["rl.kl.coef=0", "rl.kl.in_reward=true"], ["rl.kl: in_reward or target is set but coef is 0"]),
    ("rl", ["rl.kl.coef=0", "rl.kl.target=6"], ["rl.kl: in_reward or target is set but coef is 0"]),
    ("pref", ["pref.loss_args.beta=-0.1"], ["pref.loss_args.beta: -0.1;", "must be a number > 0"]),
    ("pref", ["pref.loss_args.beta=0"], ["pref.loss_args.beta: 0;"]),
    ("pref", ["pref.reference=none"], ["pref.reference: 'none' is incompatible with pref.loss 'dpo'"]),
    (
        "pref",
        ["pref.loss=simpo", "pref.reference=on_the_fly"],
        ["pref.reference: 'on_the_fly' is incompatible with pref.loss 'simpo', which is reference-free"],
    ),
    ("pref", ["pref.loss=dpo", "pref.loss_args.tau=1"], ["pref.loss_args: ['tau'] are not hyper-parameters of 'dpo'"]),
]


@pytest.mark.parametrize(("command", "overrides", "words"), CONFIG_CASES, ids=range(len(CONFIG_CASES)))
def test_bad_config_is_one_line_naming_the_key(command, overrides, words, tmp_path, capsys):
    data = "data.task.name=arithmetic"
    code, err = run_cli([command, *TINY, data, f"output_dir={tmp_path}", *overrides], capsys)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any training


def test_reference_free_loss_without_a_reference_setting_runs(tmp_path, capsys):
    code, err = run_cli(
        [
            "pref",
            *TINY,
            "data.task.name=arithmetic",
            "data.task.train_size=50",
            "data.task.eval_size=4",
            "eval.max_new_tokens=2",
            "pref.loss=simpo",
            f"output_dir={tmp_path}",
        ],
        capsys,
    )
    assert code == 0, err


# --- inputs that would exhaust memory or the stack, or train silently (issue #21, item 7) -----------------

@pytest.mark.parametrize(
    ("command", "overrides", "words"),
    [
        ("sft", ["data.max_length=4096"], ["data.max_length=4096 tokens is more than the model's 2048 positions",
                                           "set data.max_length to at most 2048"]),
        ("rm", ["data.max_length=2049"], ["data.max_length=2049 tokens is more than the model's 2048 positions"]),
        (
            "rl",
            ["rl.sampling.max_new_tokens=2000", "rl.group_size=2"],
            ["data.max_length=512 + rl.sampling.max_new_tokens=2000 = 2512 tokens is more than the model's 2048"],
        ),
    ],
)
def test_sequences_longer_than_the_model_positions_are_refused_at_start(command, overrides, words, tmp_path, capsys):
    # qwen2-tiny has 2048 positions; longer sequences trained silently past them
    code, err = run_cli([command, *TINY, "data.task.name=arithmetic", f"output_dir={tmp_path}", *overrides], capsys)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_pair_whose_chosen_equals_rejected_is_named_or_skipped(tmp_path, capsys):
    # its DPO loss has a zero gradient: it trained silently
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4", "rejected": "4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["pref", *TINY, f"data.train={path}", "train.batch_size=1"]
    code, err = run_cli([*argv, f"output_dir={tmp_path / 'a'}"], capsys)
    assert_one_line_error(code, err, f"{path} line 2: 'chosen' and 'rejected' are the same tokens")
    code, err = run_cli([*argv, "data.on_bad_row=skip", f"output_dir={tmp_path / 'b'}"], capsys)
    assert code == 0, err
    assert f"{path}: 2 rows, 1 skipped (identical pair: 1), 0 truncated, 0 dropped" in " ".join(err.split())


def test_a_lone_surrogate_is_one_line_naming_the_row_and_field(tmp_path, capsys):
    # the tokenizer raised TypeError on it
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+1=\\ud800", "completion": "2"}\n')
    code, err = run_cli(["sft", *TINY, f"data.train={path}", f"output_dir={tmp_path}"], capsys)
    assert_one_line_error(code, err, f"{path} line 2: field 'prompt': lone surrogate U+D800 at character 5")


def test_deep_nesting_and_huge_rows_are_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    deep = json.dumps(GOOD)[:-1] + ', "junk": ' + "[" * 100_000 + "]" * 100_000 + "}"  # RecursionError, also skipped
    huge = json.dumps({"prompt": "1+1=", "completion": "2" * 17 * 2**20})  # over the 16 MiB a row may hold
    long = json.dumps({"prompt": "1+1=", "completion": "2" * 4 * 2**20})  # cut before tokenising, then truncated
    path.write_text("\n".join([json.dumps(GOOD), deep, huge, long]) + "\n")
    argv = ["sft", *TINY, f"data.train={path}", "data.on_bad_row=skip", "data.max_length=32"]
    code, err = run_cli([*argv, f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 0, err
    counts = "4 rows, 2 skipped (row too large: 1, too deep: 1), 1 truncated, 0 dropped"
    assert f"data: {path}: {counts}" in " ".join(err.split())


def test_a_yaml_bomb_recipe_is_one_short_line(tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    recipe.write_text("\n".join([*lines, "train:", "  lr: *a8"]) + "\n")
    code, err = run_cli(["sft", str(recipe), *TINY, "data.task.name=arithmetic", f"output_dir={tmp_path}"], capsys)
    assert_one_line_error(code, err, f"recipe {recipe} line 5: aliases expand the document past")
    assert len(err) < 400
