"""SFT end to end on the arithmetic task (CPU, qwen2-tiny, seconds): learning, outputs, exact resume,
micro-batching and packing invariance, the Python API with in-memory rows, and the epoch sampler."""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import posttrain.api as api
from posttrain.config import SFTConfig, validate
from posttrain.data import EpochSampler
from posttrain.data.errors import DataError
from posttrain.policies import build_model, load_model
from posttrain.tasks import build_builtin_tokenizer
from posttrain.trainers.sft import train_sft


def config(output_dir: Path, **train: Any) -> dict[str, Any]:
    return {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"task": {"name": "arithmetic", "train_size": 500, "eval_size": 20}},
        "train": {"max_steps": 30, "batch_size": 16, "lr": 3e-3, "warmup_steps": 3, **train},
        "eval": {"max_new_tokens": 4},
        "output_dir": str(output_dir),
    }


def run(cfg: dict[str, Any], **kwargs: Any):
    return train_sft(validate(SFTConfig, cfg), progress=False, **kwargs)


def train_lines(run_dir: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


def test_loss_falls_and_the_run_writes_its_outputs(tmp_path: Path) -> None:
    result = run(config(tmp_path, save_every=10, keep_last=2))
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 30 and [h["step"] for h in result.history] == list(range(1, 31))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # a random init starts near log V ~ 5.9 nats per token; 30 steps learn the digit distribution
    assert last < first - 1.0, (first, last)
    # metrics.jsonl: one train line per step, then the final eval line
    lines = train_lines(tmp_path)
    assert [x["step"] for x in lines] == list(range(1, 31))
    assert [x["loss"] for x in lines] == pytest.approx(losses)
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    # the held-out evaluation before training (step 0) and after it (step 30)
    assert [e["step"] for e in evals] == [0, 30] and all("eval_accuracy" in e and "eval_loss" in e for e in evals)
    assert result.eval is not None and result.eval.num_prompts == 20
    # checkpoints at 10, 20 (periodic) and 30 (final); keep_last=2 leaves 20 and 30
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000020", "step-00000030"]
    # final/ is a standalone model directory with the trained weights
    assert result.final_dir == tmp_path / "final"
    loaded = load_model(result.final_dir)
    trained = result.model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_steps=20, save_every=10, keep_last=5)
    history = run(cfg).history
    uninterrupted = [h["loss"] for h in history]
    # pretend the run died just after step 10: step 20 and the final model never got written
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000020")
    shutil.rmtree(tmp_path / "final")
    torch.manual_seed(999)  # the resumed run must restore every RNG itself, not rely on the global one
    resumed = run(cfg, resume=True)
    losses = [h["loss"] for h in resumed.history]
    assert len(losses) == 20
    # steps 1..10 are the checkpoint's records (even their wall-clock step times), not a fresh run's
    assert resumed.history[:10] == history[:10]
    torch.testing.assert_close(torch.tensor(losses[10:]), torch.tensor(uninterrupted[10:]), atol=1e-6, rtol=0)
    # metrics.jsonl was rewritten to the checkpoint's history and then continued: steps 1..20 once each
    assert [x["step"] for x in train_lines(tmp_path)] == list(range(1, 21))
    assert (tmp_path / "final" / "config.json").is_file()



def test_resume_with_a_model_passed_in_continues_from_the_checkpoint_weights(tmp_path: Path) -> None:
    tokenizer = build_builtin_tokenizer("arithmetic")

    def fresh_model() -> Any:  # the same initial weights every call
        return build_model("qwen2-tiny", tokenizer, seed=0)

    cfg = config(tmp_path, max_steps=6, save_every=3, keep_last=5)
    uninterrupted = [h["loss"] for h in run(cfg, model=fresh_model(), tokenizer=tokenizer).history]
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "final")
    # the caller's model holds the initial weights; the resumed run must train on from step 3's
    resumed = run(cfg, model=fresh_model(), tokenizer=tokenizer, resume=True)
    torch.testing.assert_close(
        torch.tensor([h["loss"] for h in resumed.history[3:]]), torch.tensor(uninterrupted[3:]), atol=1e-6, rtol=0
    )

def test_resume_without_a_checkpoint_starts_fresh(tmp_path: Path) -> None:
    a = run(config(tmp_path / "a", max_steps=3))
    b = run(config(tmp_path / "b", max_steps=3), resume=True)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def test_micro_batching_does_not_change_the_loss_or_the_update(tmp_path: Path) -> None:
    whole = run(config(tmp_path / "whole", max_steps=2)).history
    micro = run(config(tmp_path / "micro", max_steps=2, micro_batch_size=4)).history
    # step 1: same weights, same 16 examples, the loss is a token mean over all 16 either way
    assert micro[0]["tokens"] == whole[0]["tokens"]
    assert micro[0]["loss"] == pytest.approx(whole[0]["loss"], abs=1e-5)
    assert micro[0]["grad_norm"] == pytest.approx(whole[0]["grad_norm"], abs=1e-5)
    # step 2 sees the same update
    assert micro[1]["loss"] == pytest.approx(whole[1]["loss"], abs=1e-5)


def test_packing_gives_the_same_first_step_loss(tmp_path: Path) -> None:
    padded = run(config(tmp_path / "padded", max_steps=1)).history[0]
    cfg = config(tmp_path / "packed", max_steps=1)
    cfg["data"] |= {"packing": True, "max_length": 64}
    packed = run(cfg).history[0]
    assert packed["tokens"] == padded["tokens"]
    assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-4)


def test_python_api_with_in_memory_rows(tmp_path: Path) -> None:
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(20)]
    evals = [{"prompt": "3+4=", "answer": "7"}, {"prompt": "1+1=", "answer": "2"}]
    result = api.sft(
        {
            "model": {"preset": "llama-tiny", "tokenizer": "arithmetic"},
            # the config must name a data source; the rows passed in replace it
            "data": {"train": "in-memory"},
            "train": {"max_steps": 9, "batch_size": 8},
            "eval": {"max_new_tokens": 3},
            "output_dir": str(tmp_path),
        },
        overrides=["train.max_steps=4"],
        train=rows,
        eval=evals,
        progress=False,
    )
    assert len(result.history) == 4
    # 20 rows, batch 8: steps take 8 + 8 + 4 (end of epoch 0) + 4 (epoch 1) examples, tokens > 0
    assert all(h["tokens"] > 0 for h in result.history)
    assert result.eval is not None and result.eval.num_prompts == 2
    assert (tmp_path / "final" / "config.json").is_file()


def test_python_api_rejects_bad_rows(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_steps=1)
    with pytest.raises(DataError, match="train rows row 2"):
        api.sft(cfg, train=[{"prompt": "1+1=", "completion": "2"}, "not a row"], progress=False)


# ---------------------------------------------------------------- EpochSampler


def test_epoch_sampler_covers_each_epoch_once() -> None:
    sampler = EpochSampler(5, seed=0)
    first, second = sampler.take(5), sampler.take(5)
    assert sorted(first) == [0, 1, 2, 3, 4] and sorted(second) == [0, 1, 2, 3, 4]
    assert sampler.state_dict() == {"epoch": 1, "cursor": 5}
    # epoch 1 is used up, so the next 3 come from epoch 2
    assert len(set(sampler.take(3))) == 3
    assert sampler.state_dict() == {"epoch": 2, "cursor": 3}
    # a take across the boundary: the last 2 of epoch 2, then 2 of epoch 3
    assert len(sampler.take(4)) == 4
    assert sampler.state_dict() == {"epoch": 3, "cursor": 2}


def test_epoch_sampler_resumes_the_exact_sequence() -> None:
    reference = EpochSampler(7, seed=3)
    stream = [reference.take(3) for _ in range(10)]  # 30 items, 4+ epochs
    sampler = EpochSampler(7, seed=3)
    for batch in stream[:4]:
        assert sampler.take(3) == batch
    state = sampler.state_dict()  # mid-epoch: 12 taken = epoch 1, cursor 5
    assert state == {"epoch": 1, "cursor": 5}
    restored = EpochSampler(7, seed=3)
    restored.load_state_dict(state)
    assert [restored.take(3) for _ in range(6)] == stream[4:]


def test_epoch_sampler_depends_on_the_seed_and_rejects_empty_data() -> None:
    assert EpochSampler(50, seed=0).take(50) != EpochSampler(50, seed=1).take(50)
    with pytest.raises(DataError, match="no training examples"):
        EpochSampler(0, seed=0)


def test_resuming_a_finished_run_writes_final_again_and_more_steps_go_on(tmp_path: Path, capsys) -> None:
    first = run(config(tmp_path, max_steps=2))
    shutil.rmtree(tmp_path / "final")  # as a kill while final/ was written leaves it (it is renamed in whole)
    again = run(config(tmp_path, max_steps=2), resume=True)
    assert "final/ written again" in capsys.readouterr().out
    assert [h["loss"] for h in again.history] == [h["loss"] for h in first.history]
    loaded = load_model(tmp_path / "final")
    assert all(torch.equal(v, first.model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert len(run(config(tmp_path, max_steps=3), resume=True).history) == 3  # one more step, after the two


def test_the_first_lines_say_which_forward_runs(tmp_path: Path, capsys) -> None:
    run(config(tmp_path, max_steps=1))
    said = capsys.readouterr()
    assert "forward path: posttrain's layer forward (qwen2 adapter)" in said.out + said.err
