"""Data-parallel training on 2 gloo ranks (issue #24.2): SFT, DPO and the reward model train exactly as one
process does on the same global batch (within float rounding), launched by `posttrain CMD --nproc 2` (torchrun),
with one metrics.jsonl, one final/ and checkpoints a one-process run resumes from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.cli import main
from posttrain.policies import load_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMMON = ["model.preset=qwen2-tiny", "model.tokenizer=arithmetic", "data.task.name=arithmetic", "train.max_steps=3",
          "train.batch_size=8", "train.save_every=2", "eval.max_new_tokens=2"]  # fmt: skip
RUNS = {
    "sft": [*COMMON, "data.task.train_size=64", "data.task.eval_size=4"],
    "pref": [*COMMON, "data.task.kind=preference", "data.task.train_size=32", "data.task.eval_size=8",
             "eval.limit=4", "pref.loss=dpo", "train.lr=3e-3"],
    "rm": [*COMMON, "data.task.kind=preference", "data.task.train_size=32", "data.task.eval_size=8",
           "eval.limit=4"],
}  # fmt: skip


def train_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


def two_ranks(command: str, overrides: list[str], out: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "posttrain", command, *overrides, f"output_dir={out}", "--nproc", "2"]
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "pref", "rm"])
def test_two_ranks_train_as_one_process_on_the_same_global_batch(command: str, tmp_path: Path) -> None:
    assert main([command, *RUNS[command], f"output_dir={tmp_path / 'one'}"]) == 0
    done = two_ranks(command, RUNS[command], tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = train_lines(tmp_path / "one"), train_lines(tmp_path / "two")
    assert [x["step"] for x in two] == [1, 2, 3]  # one metrics.jsonl, written by rank 0 alone
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6)
    assert done.stdout.count("final model:") == 1 and "distributed: 2 ranks" in done.stderr + done.stdout
    if command != "rm":  # a causal LM: the final weights agree
        weights_one, weights_two = (load_model(tmp_path / d / "final").state_dict() for d in ("one", "two"))
        for name, tensor in weights_one.items():
            torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_checkpoints_of_two_ranks_resume_on_one(tmp_path: Path) -> None:
    overrides = [*RUNS["sft"][:3], *RUNS["sft"][4:], "train.max_steps=2"]  # stop after step 2
    done = two_ranks("sft", overrides, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["sft", *RUNS["sft"], f"output_dir={tmp_path / 'run'}", "--resume"]) == 0
    whole = tmp_path / "whole"
    assert main(["sft", *RUNS["sft"], f"output_dir={whole}"]) == 0
    assert [x["loss"] for x in train_lines(tmp_path / "run")] == pytest.approx(
        [x["loss"] for x in train_lines(whole)], rel=1e-5)


SCRIPT = Path(__file__).parent / "scripts" / "rl_update_ranks.py"


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["grpo", "reinforce_pp"])  # group baselines; a batch-wide normalisation
def test_an_rl_update_on_two_ranks_equals_one_process_on_the_same_global_batch(advantage: str, tmp_path: Path) -> None:
    one = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one.pt"), advantage], env=ENV,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(SCRIPT), str(tmp_path / "two.pt"), advantage], env=ENV, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    grads_one, grads_two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert any(g.abs().max() > 1e-4 for g in grads_one.values())  # the update is not nothing
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_two[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_grpo_on_two_ranks_trains_checkpoints_and_resumes_on_one(tmp_path: Path) -> None:
    overrides = ["model.preset=qwen2-tiny", "model.tokenizer=arithmetic", "data.task.name=arithmetic",
                 "data.task.train_size=64", "data.task.eval_size=4", "eval.max_new_tokens=2", "rl.prompts_per_step=4",
                 "rl.group_size=4", "rl.sampling.max_new_tokens=3", "rl.kl.coef=0.05",
                 "train.save_every=1"]  # fmt: skip
    done = two_ranks("rl", [*overrides, "train.max_steps=2"], tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [x["step"] for x in train_lines(tmp_path / "run")] == [1, 2]
    assert main(["rl", *overrides, "train.max_steps=3", f"output_dir={tmp_path / 'run'}", "--resume"]) == 0
    assert [x["step"] for x in train_lines(tmp_path / "run")] == [1, 2, 3]


def one_process(command: str, overrides: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "posttrain", command, *overrides, f"output_dir={out}", *extra]
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=600)


FSDP = [*RUNS["sft"], "train.parallel=fsdp"]


@pytest.mark.slow
def test_fsdp_on_one_rank_trains_as_ddp_checkpoints_and_resumes(tmp_path: Path) -> None:
    assert main(["sft", *RUNS["sft"], f"output_dir={tmp_path / 'ddp'}"]) == 0
    whole = one_process("sft", FSDP, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = one_process("sft", [*FSDP, "train.max_steps=2"], tmp_path / "cut")
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert (tmp_path / "cut" / "checkpoints" / "step-00000002" / "shards").is_dir()  # torch.distributed.checkpoint
    resumed = one_process("sft", FSDP, tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = [x["loss"] for x in train_lines(tmp_path / "ddp")]
    assert [x["loss"] for x in train_lines(tmp_path / "whole")] == pytest.approx(expected, rel=1e-6)
    assert [x["loss"] for x in train_lines(tmp_path / "cut")] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_fsdp_on_two_ranks_trains_as_one_and_its_shards_resume_on_one(tmp_path: Path) -> None:
    assert main(["sft", *RUNS["sft"], f"output_dir={tmp_path / 'one'}"]) == 0
    expected = [x["loss"] for x in train_lines(tmp_path / "one")]
    two = two_ranks("sft", FSDP, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert [x["loss"] for x in train_lines(tmp_path / "two")] == pytest.approx(expected, rel=1e-5)
    cut = two_ranks("sft", [*FSDP, "train.max_steps=2"], tmp_path / "cut")
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = one_process("sft", FSDP, tmp_path / "cut", "--resume")  # written by 2 ranks, resumed on 1
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [x["loss"] for x in train_lines(tmp_path / "cut")] == pytest.approx(expected, rel=1e-5)
    weights_one, weights_two = (load_model(tmp_path / d / "final").state_dict() for d in ("one", "two"))
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5)
