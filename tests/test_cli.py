"""The command line: exit codes, one-line user errors, help text, and each command on tiny inputs."""

import json
import typing
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.config import ConfigError


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step SFT run through the CLI; its final/ model directory."""
    out = tmp_path_factory.mktemp("sft")
    code = main(
        [
            "sft",
            "model.preset=qwen2-tiny",
            "model.tokenizer=arithmetic",
            "data.task.name=arithmetic",
            "data.task.train_size=50",
            "data.task.eval_size=4",
            "train.max_steps=3",
            "train.batch_size=4",
            "eval.max_new_tokens=2",
            f"output_dir={out}",
        ]
    )
    assert code == 0
    return out / "final"


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "presets: qwen2-tiny" in out and "tasks: arithmetic" in out
    assert main(["list", "presets"]) == 0
    assert capsys.readouterr().out.startswith("presets: ")


def test_list_of_an_unknown_table_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: list: 'nonsense' is not a list")


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "sft" in capsys.readouterr().out


def test_sft_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["sft", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("train.lr "))
    assert "0.001" in line and "learning rate" in line
    assert "model.path" in out and "--resume" in out


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _leaf_descriptions(model, prefix: str = "") -> dict[str, str]:
    """key -> the field's whole docstring, for every field of the config and of its sections (optional ones
    too), read from pydantic's model fields rather than from the help code."""
    from pydantic import BaseModel

    out = {}
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        sections = [
            arg
            for arg in (field.annotation, *getattr(field.annotation, "__args__", ()))
            if isinstance(arg, type) and issubclass(arg, BaseModel)
        ]
        if not sections or field.default is None:  # a section always present has no row of its own
            out[prefix + name] = " ".join((field.description or "").split())
        listed = typing.get_origin(field.annotation) is list
        for section in sections:
            out |= _leaf_descriptions(section, f"{prefix}{name}[]." if listed else f"{prefix}{name}.")
    return out


@pytest.mark.parametrize("columns", ["60", "200"])
@pytest.mark.parametrize(
    ("command", "config_name"),
    [("sft", "SFTConfig"), ("pref", "PrefConfig"), ("rm", "RMConfig"), ("rl", "RLConfig"), ("eval", "EvalConfig")],
)
def test_help_shows_every_option_with_its_whole_description(command, config_name, columns, capsys, monkeypatch):
    import posttrain.config as config

    monkeypatch.setenv("COLUMNS", columns)
    out = _help(command, capsys)
    flat = " ".join(out.split())
    for key, description in _leaf_descriptions(getattr(config, config_name)).items():
        assert f" {key} " in flat, key
        assert description in flat, (key, description)  # never cut short with "..."
    # wrapped to the terminal; a line runs past it only to show a long default whole, its description below it
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("options (key=value"))
    for line, after in zip(lines[start:], lines[start + 1 :]):
        assert len(line) <= int(columns) or (line.split()[0] in flat and after.startswith(" " * 6)), line


def test_help_lists_allowed_and_registered_values(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    pref = " ".join(_help("pref", capsys).split())
    assert "Allowed: precomputed, on_the_fly, none." in pref  # pref.reference, a Literal
    assert "Allowed: best_vs_worst, all_pairs, rso, threshold, top_k, all, null." in pref  # online.select, optional
    assert "Allowed: keep, refresh." in pref  # inside the optional `online` section
    from posttrain.objectives.registry import KL_ESTIMATORS, PREFERENCE_LOSSES

    assert f"Registered: {', '.join(sorted(PREFERENCE_LOSSES))}." in pref  # pref.loss names a registered loss
    rl = " ".join(_help("rl", capsys).split())
    assert f"Registered: {', '.join(sorted(KL_ESTIMATORS))}." in rl  # rl.kl.estimator


def test_task_writes_data_and_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "arith"
    assert main(["task", "arithmetic", str(out), "--train-size", "30", "--eval-size", "7", "--seed", "1"]) == 0
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 30 and len(evals) == 7
    assert set(train[0]) == {"prompt", "completion", "answer"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "train.jsonl"), str(out / "eval.jsonl"), str(out / "tokenizer")]


def test_task_writes_worked_demonstrations_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "arith"
    assert main(["task", "arithmetic", str(out), "--train-size", "200", "--think-fraction", "1"]) == 0
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert all(r["completion"].startswith("<think>") and r["completion"].endswith(r["answer"]) for r in train)
    assert main(["task", "arithmetic", str(tmp_path / "x"), "--operators", "*", "--think-fraction", "0.5"]) == 2
    assert "think_fraction" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_override_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sft", "model.path=/x", "data.train=t.jsonl", "train.lr=-1"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("error: train.lr:") and "greater than 0" in lines[0]
    assert lines[1:] == ["(run again with --debug for the traceback)"]
    assert "Traceback" not in captured.err


def test_malformed_override_and_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # "foo" has no "=", so it is read as a recipe path that does not exist
    assert main(["sft", "foo"]) == 2
    assert "error: recipe foo does not exist" in capsys.readouterr().err
    assert main(["sft", "model.path=/x", "data.train=t.jsonl", "=3"]) == 2
    assert "error: override '=3' must look like key.sub=value" in capsys.readouterr().err
    # a valid config whose model directory does not exist: a ModelLoadError, also one line
    missing = tmp_path / "no-model"
    code = main(["eval", f"model.path={missing}", "data.task.name=arithmetic", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: model.") and str(missing) in err and "Traceback" not in err


def test_a_misspelt_kernel_choice_stops_the_run_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the demo-sized model never reaches a oneDNN-sized product, so only the start-up check can report it
    monkeypatch.setenv("POSTTRAIN_CPU_MATMUL", "fast")
    overrides = ["model.preset=qwen2-tiny", "model.tokenizer=arithmetic", "data.task.name=arithmetic"]
    code = main(["sft", *overrides, "train.max_steps=1", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: POSTTRAIN_CPU_MATMUL='fast' is not one of auto, onednn, blas")
    assert not (tmp_path / "final").exists()


def test_a_misspelt_cuda_graphs_choice_stops_a_cpu_run_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a CPU run never decodes through a graph, so only the start-up check can report it
    monkeypatch.setenv("POSTTRAIN_CUDA_GRAPHS", "yes")
    overrides = ["model.preset=qwen2-tiny", "model.tokenizer=arithmetic", "data.task.name=arithmetic"]
    for command in (["sft", *overrides, "train.max_steps=1"], ["eval", *overrides]):
        code = main([*command, f"output_dir={tmp_path}"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: POSTTRAIN_CUDA_GRAPHS='yes': allowed 0"), err
    assert not (tmp_path / "final").exists()


def test_debug_reraises(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"train\.lr"):
        main(["sft", "--debug", "model.path=/x", "data.train=t.jsonl", "train.lr=-1"])


def test_sft_writes_a_loadable_model(trained: Path) -> None:
    assert (trained / "config.json").is_file() and (trained / "tokenizer.json").is_file()
    lines = [json.loads(x) for x in (trained.parent / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3]


def test_eval_on_the_trained_model(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "eval",
            f"model.path={trained}",
            "data.task.name=arithmetic",
            "data.task.eval_size=10",
            "eval.max_new_tokens=3",
            f"output_dir={tmp_path}",
        ]
    )
    assert code == 0
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["num_prompts"] == 10 and len(written["examples"]) == 10
    assert 0.0 <= written["metrics"]["accuracy"] <= 1.0
    # each example's verdict agrees with the numeric verifier on the generated completion
    from posttrain.tasks import verify

    for example in written["examples"]:
        assert example["correct"] == verify(example["completion"], example["answer"])
    captured = capsys.readouterr()
    assert f"written: {tmp_path / 'eval.json'}" in captured.out
    assert "held-out generation, 10 prompts: 1 batches in " in captured.err  # the long step says what it did


def test_generate_prints_json_lines(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["generate", str(trained), "--prompt", "1+1=", "--n", "2", "--temperature", "0", "--max-new-tokens", "3"]
    )
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2
    assert all(x["prompt"] == "1+1=" and isinstance(x["completion"], str) for x in lines)
    assert lines[0]["completion"] == lines[1]["completion"]  # greedy: both samples agree


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt", ""], "prompt 2 ('') has no tokens"),
        (["--n", "0"], "n=0; give at least 1 completion per prompt"),
        (["--temperature", "-1"], "temperature=-1.0 is out of range; allowed: at least 0 (0: greedy)"),
        (["--top-p", "0"], "top_p=0.0 is out of range; allowed: in (0, 1] (1: off)"),
        (["--max-new-tokens", "0"], "max_new_tokens=0 is out of range; allowed: at least 1"),
    ],
)
def test_generate_names_a_bad_prompt_or_setting(trained: Path, capsys: pytest.CaptureFixture[str], flags, message):
    # one `error:` line and exit code 2, no traceback (the arithmetic tokenizer adds no BOS to an empty prompt)
    assert main(["generate", str(trained), "--prompt", "1+1=", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_report_summarises_a_run(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(trained.parent)]) == 0
    out = capsys.readouterr().out
    assert "steps" in out and "loss" in out
    assert main(["report", str(trained)]) == 2  # final/ has no metrics.jsonl
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_a_torn_last_metrics_line_is_left_out(trained: Path, tmp_path: Path, capsys) -> None:
    # a run killed while writing metrics.jsonl leaves half a line: report reads the rest, and a run logging into
    # that directory starts its first record on a line of its own
    from posttrain.runtime.logging import RunLogger, read_metrics

    run = tmp_path / "run"
    run.mkdir()
    whole = (trained.parent / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(whole + '{"step": 99, "kind": "tra')
    assert main(["report", str(run)]) == 0
    assert "steps" in capsys.readouterr().out
    log = RunLogger(run, total_steps=1, progress=False)
    log.log(100, {"loss": 1.0})
    log.close()
    records = read_metrics(run)
    assert len(records) == len(whole.splitlines()) + 1 and records[-1]["step"] == 100


@pytest.mark.parametrize(
    "case", ["recipe not utf-8", "recipe is a directory", "output_dir is a file", "task into a file"]
)
def test_unwritable_or_unreadable_paths_are_one_error_line(case: str, tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# caf\xe9\nseed: 1\n".encode("latin-1"))
    tiny = ["model.preset=qwen2-tiny", "model.tokenizer=arithmetic", "data.task.name=arithmetic", "train.max_steps=1"]
    argv, message = {
        "recipe not utf-8": (["sft", str(latin1), *tiny], "is not UTF-8 text"),
        "recipe is a directory": (["sft", str(tmp_path), *tiny], "is a directory; give the recipe's YAML file"),
        "output_dir is a file": (["sft", *tiny, f"output_dir={a_file / 'run'}"], "output_dir: "),
        "task into a file": (["task", "arithmetic", str(a_file)], "OUT_DIR: "),
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("device", "gpus", "mps", "message"),
    [
        ("cuda", 0, False, "error: device: 'cuda' was asked for but CUDA is not available"),
        ("cuda:0", 0, False, "error: device: 'cuda:0' was asked for but CUDA is not available"),
        ("cuda:3", 1, False, "error: device: 'cuda:3' asks for GPU 3, but this machine has 1 CUDA device(s)"),
        ("mps", 0, False, "error: device: 'mps' was asked for but MPS (Apple GPU) is not available"),
        ("banana", 0, False, "error: device: 'banana' is not a device; use one of auto, cpu, cuda, cuda:N, mps"),
        ("meta", 0, False, "error: device: 'meta' is not supported; use one of auto, cpu, cuda, cuda:N, mps"),
    ],
)
def test_a_device_this_machine_lacks_is_one_error_line(
    device: str, gpus: int, mps: bool, message: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    tiny = ["model.preset=qwen2-tiny", "model.tokenizer=arithmetic", "data.task.name=arithmetic"]
    for command in (["sft", *tiny, "train.max_steps=1"], ["eval", *tiny]):
        assert main([*command, f"device={device}", f"output_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0].startswith(message), err
        assert err.splitlines()[1:] == ["(run again with --debug for the traceback)"]
    assert not (tmp_path / "final").exists()
