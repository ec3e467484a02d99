"""Online RL trainer: a few CPU steps on the arithmetic task from a briefly SFT-trained tiny model."""

import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from posttrain.api import rl, sft
from posttrain.config import ConfigError, RLConfig, load_config
from posttrain.policies import load_model
from posttrain.runtime.guards import TrainingStopped
from posttrain.runtime.signals import TrainingInterrupted

RECIPES = Path(__file__).parents[2] / "recipes"
PRESETS = [
    "grpo",
    "ppo",
    "dr_grpo",
    "dapo",
    "rloo",
    "remax",
    "reinforce_pp",
    "reinforce",
    "gspo",
    "cispo",
    "topr",
    "r1",
    "grpo-k2",
    "grpo-trl",
    "ppo-adaptive_kl",
    "reinforce_pp_baseline",
    "gmpo",
    "sapo",
    "bnpo",
    "nft",
    "spo",
]
TASK = {"name": "arithmetic", "digits": 1, "operators": "+-", "train_size": 2000, "eval_size": 32}


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("sft")
    config = {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"task": TASK, "max_length": 16},
        "train": {"max_steps": 150, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10},
        "eval": {"max_new_tokens": 4, "limit": 8},
        "output_dir": str(out),
    }
    return str(sft(config, progress=False).final_dir)


def config(model_path: str, out: Path, **sections) -> dict:
    base = {
        "model": {"path": model_path},
        "data": {"task": TASK, "max_length": 16},
        "train": {"max_steps": 2, "lr": 1e-4},
        "eval": {"max_new_tokens": 4, "limit": 8},
        "rl": {"prompts_per_step": 4, "group_size": 4, "sampling": {"max_new_tokens": 4}},
        "output_dir": str(out),
        "seed": 0,
    }
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(base.get(key), dict) else value
    return base


def test_grpo_raises_the_mean_reward_on_its_prompts(sft_model: str, tmp_path: Path) -> None:
    # Eight fixed training problems, every one in every step: GRPO must raise their sampled accuracy.
    # (Held-out accuracy is the demo's business; bench/rl_demo.py measures it.)
    cfg = config(
        sft_model,
        tmp_path,
        data={"task": {**TASK, "train_size": 8}},
        train={"max_steps": 30, "lr": 1e-3},
        rl={"prompts_per_step": 8, "group_size": 8, "sampling": {"max_new_tokens": 4}},
    )
    history = rl(cfg, progress=False).history
    rewards = [h["rewards/total/mean"] for h in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, (first, last)


def test_micro_batching_does_not_change_the_update(sft_model: str, tmp_path: Path) -> None:
    params, steps = [], []
    for micro in (16, 4):
        cfg = config(
            sft_model,
            tmp_path / str(micro),
            train={"max_steps": 1},
            rl={"prompts_per_step": 4, "group_size": 4, "micro_batch_size": micro, "sampling": {"max_new_tokens": 4}},
        )
        result = rl(cfg, progress=False)
        params.append(torch.cat([p.detach().flatten() for p in result.model.parameters()]))
        steps.append(result.history[0])
    # the loss and the gradient's norm, before the optimiser: a micro-batch counted twice, dropped or averaged
    # on its own would change them
    assert steps[1]["loss"] == pytest.approx(steps[0]["loss"], rel=1e-5, abs=1e-7)
    assert steps[1]["grad_norm"] == pytest.approx(steps[0]["grad_norm"], rel=1e-5)
    # AdamW's first step moves a weight by lr * g / (|g| + 1e-8): where g is within float32 rounding of zero,
    # summing in another order moves it by a noticeable fraction of lr (measured on an Intel Xeon: 24% of it,
    # for 1 weight in 122,752), so weights are held to half a step; a wrong gradient moves many by up to 2 lr
    torch.testing.assert_close(params[0], params[1], atol=0.5 * steps[0]["lr"], rtol=0)


def test_a_user_registered_advantage_runs_and_unknown_names_are_listed(sft_model: str, tmp_path: Path) -> None:
    plugin = tmp_path / "my_objectives.py"
    plugin.write_text(
        "from posttrain.objectives.registry import advantage\n\n"
        "@advantage('my_adv', needs=('groups',))\n"
        "def my_adv(rewards_PG, *, group_size, scale=1.0):\n"
        "    r = rewards_PG.view(-1, group_size)\n"
        "    return (scale * (r - r.mean(dim=1, keepdim=True))).flatten()\n"
    )
    cfg = config(
        sft_model, tmp_path / "run", plugins=[str(plugin)], rl={"advantage": "my_adv", "advantage_args": {"scale": 2.0}}
    )
    assert len(rl(cfg, progress=False).history) == 2
    with pytest.raises(ConfigError, match=r"registered: .*my_adv"):
        load_config(RLConfig, None, [f"model.path={sft_model}", "data.task.digits=1", "rl.advantage=nope"])
    with pytest.raises(ConfigError, match="allowed: scale"):
        load_config(
            RLConfig,
            None,
            [f"model.path={sft_model}", "data.task.digits=1", "rl.advantage=my_adv", "rl.advantage_args={typo: 1}"],
        )


def test_a_reward_from_a_user_file(sft_model: str, tmp_path: Path) -> None:
    (tmp_path / "my_reward.py").write_text(
        "def short(completions, answer, **kwargs):\n    return [1.0 if len(c) <= 2 else 0.0 for c in completions]\n"
    )
    cfg = config(sft_model, tmp_path / "run", rewards=[{"fn": f"{tmp_path / 'my_reward.py'}:short"}])
    history = rl(cfg, progress=False).history
    assert "rewards/short/mean" in history[-1]


@pytest.mark.parametrize("kl", [{}, {"kl": {"estimator": "k3", "coef": 0.1}}], ids=["no_kl", "kl_to_the_initial_model"])
def test_resume_matches_the_uninterrupted_run(kl: dict, sft_model: str, tmp_path: Path) -> None:
    # with a KL term, the resumed run's reference must still be the initial model, not the checkpoint's policy
    steps = {"max_steps": 4, "save_every": 2}
    rl_section = {**config(sft_model, tmp_path)["rl"], **kl}
    whole = rl(config(sft_model, tmp_path / "whole", train=steps, rl=rl_section), progress=False).history
    cut = config(sft_model, tmp_path / "cut", train={**steps, "max_steps": 2}, rl=rl_section)
    rl(cut, progress=False)
    resumed = rl(config(sft_model, tmp_path / "cut", train=steps, rl=rl_section), resume=True, progress=False).history
    timing = ("_s", "_per_s")
    for a, b in zip(whole, resumed, strict=True):
        assert {k: v for k, v in a.items() if not k.endswith(timing)} == {
            k: v for k, v in b.items() if not k.endswith(timing)
        }


def test_the_bias_corrected_kl_reaches_the_loop_with_the_samplers_log_probs(sft_model: str, tmp_path: Path) -> None:
    # k3_bias_corrected reads old_logp_B_T by name: at sampling time (the logged KL) it equals k3; in the loss its
    # gradient is (logp - ref) grad logp, not k3's (1 - r) grad logp, so from step 2 (policy != reference) the
    # updates differ
    runs = {}
    for estimator in ("k3", "k3_bias_corrected"):
        section = {**config(sft_model, tmp_path)["rl"], "kl": {"estimator": estimator, "coef": 1.0}}
        cfg = config(sft_model, tmp_path / estimator, train={"max_steps": 3, "lr": 1e-3}, rl=section)
        runs[estimator] = rl(cfg, progress=False)
    plain, corrected = runs["k3"], runs["k3_bias_corrected"]
    assert corrected.history[0]["kl_per_seq"] == pytest.approx(plain.history[0]["kl_per_seq"], rel=1e-5, abs=1e-9)
    assert corrected.history[-1]["kl_per_seq"] > 0
    flat = [torch.cat([p.detach().flatten() for p in r.model.parameters()]) for r in (plain, corrected)]
    assert not torch.allclose(flat[0], flat[1])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_recipes_load_and_run(name: str, sft_model: str, tmp_path: Path) -> None:
    overrides = [
        f"model.path={sft_model}",
        "data.task.digits=1",
        "data.task.train_size=200",
        "data.task.eval_size=8",
        "train.max_steps=2",
        "rl.prompts_per_step=2",
        "rl.group_size=2",
        "rl.sampling.max_new_tokens=4",
        "eval.max_new_tokens=4",
        f"output_dir={tmp_path}",
    ]
    cfg = load_config(RLConfig, RECIPES / f"arith-{name}.yaml", overrides)
    assert len(rl(cfg, progress=False).history) == 2


PRESET_SMOKE = ["data.task.digits=1", "data.task.train_size=200", "data.task.eval_size=8", "train.max_steps=2",
                "rl.prompts_per_step=2", "rl.group_size=2", "rl.sampling.max_new_tokens=4", "eval.max_new_tokens=4"]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A briefly trained reward model (the presets' own paths are runs of arith-rm.yaml)."""
    from posttrain.api import rm

    config = {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
              "data": {"task": {"name": "arithmetic", "kind": "preference", "digits": 1, "train_size": 32,
                                "eval_size": 8}},
              "train": {"max_steps": 2, "batch_size": 8}, "output_dir": str(tmp_path_factory.mktemp("rm"))}  # fmt: skip
    return str(rm(config, progress=False).final_dir)


def test_the_ensemble_preset_scores_with_its_reward_models(sft_model: str, rm_dir: str, tmp_path: Path) -> None:
    # the recipe's three reward-model members, each pointed at the test's reward model; the step's reward is the
    # ensemble's mean - lam * variance over the members
    from posttrain.config.loading import read_recipe

    raw = read_recipe(RECIPES / "arith-grpo-ensemble.yaml")
    ensemble = raw["rewards"][0]
    assert ensemble["fn"] == "ensemble" and [m["fn"] for m in ensemble["args"]["members"]] == ["reward_model"] * 3
    for member in ensemble["args"]["members"]:
        member["args"]["path"] = str(rm_dir)
    cfg = load_config(RLConfig, raw, [f"model.path={sft_model}", *PRESET_SMOKE, f"output_dir={tmp_path / 'rl'}"])
    history = rl(cfg, progress=False).history
    assert len(history) == 2 and "rewards/ensemble/mean" in history[0]


def test_the_pf_ppo_preset_runs_on_its_reward_model(sft_model: str, rm_dir: str, tmp_path: Path) -> None:
    reward = f"rewards=[{{fn: reward_model, args: {{path: {rm_dir}}}}}]"
    cfg = load_config(RLConfig, RECIPES / "arith-pf_ppo.yaml",
                      [f"model.path={sft_model}", *PRESET_SMOKE, reward, f"output_dir={tmp_path}"])  # fmt: skip
    assert cfg.rl.filtration.method == "pow" and cfg.rl.advantage == "gae"
    assert len(rl(cfg, progress=False).history) == 2


def test_filtration_trains_on_the_resampled_rows(sft_model: str, tmp_path: Path, monkeypatch) -> None:
    # PF-PPO's pow weights |r|^2 on a 0/1 reward: the wrong answers weigh 1e-8, so every row the updates see is a
    # right answer (and rows repeat); without filtration every row is seen once
    import posttrain.trainers.rl as loop

    seen: list[tuple[list[int], list[float]]] = []
    update = loop.update_minibatch

    def recording(policy, critic, step, rows, **kwargs):
        seen.append((rows.tolist(), step.rewards_PG.tolist()))
        return update(policy, critic, step, rows, **kwargs)

    monkeypatch.setattr(loop, "update_minibatch", recording)
    answers = [{"fn": f"{__file__}:odd_first_digit"}]
    rl(config(sft_model, tmp_path / "pf", rewards=answers, rl={"filtration": {"method": "pow"}}), progress=False)
    filtered, seen[:] = list(seen), []
    rl(config(sft_model, tmp_path / "all", rewards=answers), progress=False)
    assert any(any(rewards) for _, rewards in filtered)
    for rows, rewards in filtered:
        assert len(rows) == len(rewards)
        if any(rewards):  # a step without a right answer has equal weights: uniform resampling
            assert all(rewards[i] == 1.0 for i in rows)
    assert all(sorted(rows) == list(range(len(rewards))) for rows, rewards in seen)


def odd_first_digit(completions, **kwargs):
    """1 when the completion starts with an odd digit: about half the samples of any model."""
    return [1.0 if c[:1] in ("1", "3", "5", "7", "9") else 0.0 for c in completions]


def test_sigterm_finishes_the_step_saves_it_and_the_run_resumes(sft_model: str, tmp_path: Path) -> None:
    calls = []

    def answer_and_signal(completions, answer, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # during step 2's scoring, as a scheduler's preemption would arrive
            os.kill(os.getpid(), signal.SIGTERM)
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    cfg = config(sft_model, tmp_path, train={"max_steps": 4})
    with pytest.raises(TrainingInterrupted) as stopped:
        rl(cfg, rewards=[answer_and_signal], progress=False)
    assert (stopped.value.step, stopped.value.exit_code) == (2, 143)
    assert stopped.value.checkpoint.name == "step-00000002"
    resumed = rl(cfg, rewards=[answer_and_signal], resume=True, progress=False).history
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]


def test_non_finite_updates_are_skipped_then_the_run_stops(sft_model: str, tmp_path: Path) -> None:
    (tmp_path / "nan_loss.py").write_text(
        "import torch\n"
        "from posttrain.objectives.registry import policy_loss\n\n"
        "@policy_loss('nan_pg')\n"
        "def nan_pg(logp_B_T, old_logp_B_T, adv_B_T, mask_B_T):\n"
        "    '''A policy gradient whose loss is NaN: every update must be skipped.'''\n"
        "    return logp_B_T * float('nan'), torch.zeros_like(logp_B_T)\n"
    )
    cfg = config(
        sft_model,
        tmp_path / "run",
        plugins=[str(tmp_path / "nan_loss.py")],
        train={"max_steps": 5, "max_bad_steps": 3},
        rl={"policy_loss": "nan_pg"},
    )
    model, tokenizer = load_model(sft_model), AutoTokenizer.from_pretrained(sft_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingStopped, match=r"3 optimiser updates in a row had a non-finite loss"):
        rl(cfg, model=model, tokenizer=tokenizer, progress=False)
    for name, value in model.state_dict().items():  # none of the NaN updates reached the weights
        assert torch.equal(value, before[name]), name


def test_rows_without_the_column_a_reward_reads_are_refused_or_skipped(tmp_path: Path) -> None:
    # numeric_match reads `answer`: a row without it would score 0 as "not applicable" and be pushed down by its
    # advantage (found by an audit); it stops the run naming the row, or is skipped and counted
    from posttrain.data.errors import DataError

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)] + [{"prompt": "7+1="}]
    base = {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"train": "in-memory", "max_length": 16},
        "train": {"max_steps": 1, "lr": 1e-4},
        "rl": {"prompts_per_step": 2, "group_size": 2, "sampling": {"max_new_tokens": 2}},
        "output_dir": str(tmp_path / "run"),
    }
    with pytest.raises(DataError, match=r"row 7: no field 'answer', which the reward numeric_match reads"):
        rl(base, train=rows, progress=False)
    skipping = {**base, "data": {**base["data"], "on_bad_row": "skip"}, "output_dir": str(tmp_path / "skip")}
    result = rl(skipping, train=rows, progress=False)
    assert result.history[0]["rewards/numeric_match/failures"] == 0
    with pytest.raises(DataError, match="no training prompt holds"):
        rl(skipping, train=[{"prompt": "1+1="}], progress=False)


def test_prompts_too_long_are_dropped_when_the_config_says_drop(tmp_path: Path, capsys) -> None:
    # data.truncation: drop applies to RL prompts too (they were always cut to their last max_length tokens)
    from posttrain.data.errors import DataError

    rows = [{"prompt": "1+1=" * 20, "answer": "2"}] * 4
    base = {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"train": "in-memory", "max_length": 8, "truncation": "drop"},
        "train": {"max_steps": 1, "lr": 1e-4},
        "rl": {"prompts_per_step": 2, "group_size": 2, "sampling": {"max_new_tokens": 2}},
        "output_dir": str(tmp_path / "run"),
    }
    with pytest.raises(DataError, match="4 dropped"):
        rl(base, train=rows, progress=False)
    short = [{"prompt": "1+1=", "answer": "2"}] * 2
    capsys.readouterr()
    rl({**base, "output_dir": str(tmp_path / "mixed")}, train=rows + short, progress=False)
    assert "6 rows, 0 skipped, 0 truncated, 4 dropped" in capsys.readouterr().err  # trained on the short two
