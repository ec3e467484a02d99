"""Per-step PRM rewards in RL (issue #26.4): steps end at the separator the model wrote and at its last token; the
PRM's p(step right) is refined by Clip or Delta (arXiv:2410.15115); the loop adds the step rewards at the steps'
last tokens (or hands them apart to an estimator that needs them so); `rl.process_reward` in a run."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.api import rl
from posttrain.config import ConfigError, RLConfig
from posttrain.objectives import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from posttrain.rewards.process import refined_step_rewards, step_ends
from posttrain.rollout.engine import PaddedRollouts
from posttrain.trainers.rl import EpisodeView, Objectives, prepare_step, with_process_rewards

IDS = torch.tensor([[1, 9, 5, 9, 5, 9, 7, 0]])
MASK = torch.tensor([[False, False, True, True, True, True, True, False]])  # prompt 1 9, model 5 9 5 9 7, pad


def test_steps_end_at_each_separator_the_model_wrote_and_at_its_last_token():
    # separator 9: at 3 and 5 (the 9 at 1 is the prompt's); the last model token 6 ends the last step
    assert step_ends(IDS, MASK, [9]).nonzero()[:, 1].tolist() == [3, 5, 6]
    # a two-token separator "5 9" ends at its 9s; none: only the last model token
    assert step_ends(IDS, MASK, [5, 9]).nonzero()[:, 1].tolist() == [3, 5, 6]
    assert step_ends(IDS, MASK, []).nonzero()[:, 1].tolist() == [6]
    # a separator half in the prompt (9 at 1, then 5) is not the model's
    assert step_ends(IDS, MASK, [9, 5]).nonzero()[:, 1].tolist() == [4, 6]


def test_clip_and_delta_refine_the_prms_probabilities():
    # logits 0, ln 3, -ln 3 at the three ends -> p = 0.5, 0.75, 0.25
    logits = torch.zeros(1, 8)
    logits[0, 3], logits[0, 5], logits[0, 6] = 0.0, math.log(3), -math.log(3)
    logits[0, 4] = 5.0  # not a step end: ignored
    ends = step_ends(IDS, MASK, [9])

    def at_ends(refinement: str, coef: float = 1.0) -> list[float]:
        rewards = refined_step_rewards(logits, ends, refinement=refinement, eta=0.5, coef=coef)
        assert (rewards[~ends] == 0).all()
        return rewards[ends].tolist()

    assert at_ends("none") == pytest.approx([0.5, 0.75, 0.25])
    assert at_ends("clip") == pytest.approx([0.0, 0.0, -0.25])  # min(p - 0.5, 0)
    assert at_ends("delta") == pytest.approx([-0.25, 0.5, 0.0])  # p_k - p_{k+1}; the last 0
    assert at_ends("delta", coef=2.0) == pytest.approx([-0.5, 1.0, 0.0])
    # Delta's process return from step 1 telescopes to p_1 - p_K, whatever the number of steps
    assert sum(at_ends("delta")) == pytest.approx(0.5 - 0.25)


def rows() -> PaddedRollouts:
    # two episodes of one prompt token and four model tokens
    mask = torch.tensor([[False, True, True, True, True]] * 2)
    return PaddedRollouts(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool), mask,
                          torch.zeros(2, 5), torch.tensor([1, 1]))  # fmt: skip


def test_step_rewards_reach_the_tokens_before_each_steps_end():
    # episode 0: outcome 1, process 0.5 at token 2 (step 1's end) -> returns over its tokens [1.5, 1.5, 1, 1];
    # episode 1: outcome 0, no process reward -> [0, 0, 0, 0]. reinforce_pp without std scaling subtracts one batch
    # mean, so the differences of the returns survive: token 1 - token 3 of episode 0 = 0.5
    padded = rows()
    process = torch.zeros(2, 5)
    process[0, 2] = 0.5
    view = EpisodeView(padded.loss_mask_B_T, None, torch.where(padded.loss_mask_B_T, 0, -1), None, process)
    objectives = Objectives(ADVANTAGES["reinforce_pp"], POLICY_LOSSES["ppo"], AGGREGATIONS["token_mean"],
                            KL_ESTIMATORS["k3"])  # fmt: skip
    tensors, _ = prepare_step(padded, {"rewards_PG": torch.tensor([1.0, 0.0]), "group_size": 2}, objectives,
                              advantage_args={"scale_std": False}, reference=None, critic=None, kl_coef=0.0,
                              kl_in_reward=False, temperature=1.0, micro_batch_size=None,
                              episodes=view)  # fmt: skip
    adv = tensors.adv_B_T
    # batch mean of the returns: (1.5 + 1.5 + 1 + 1 + 0 * 4) / 8 = 0.625
    torch.testing.assert_close(adv[0, 1:], torch.tensor([0.875, 0.875, 0.375, 0.375]))
    torch.testing.assert_close(adv[1, 1:], torch.full((4,), -0.625))
    assert tensors.rewards_PG.tolist() == [1.5, 0.0]  # the sequence reward holds the step rewards


def test_an_estimator_that_needs_process_rewards_gets_them_apart_from_the_outcome():
    padded = rows()
    process = torch.zeros(2, 5)
    process[0, 2] = 0.5
    view = EpisodeView(padded.loss_mask_B_T, None, torch.where(padded.loss_mask_B_T, 0, -1), None, process)
    available, kept = with_process_rewards({"rewards_PG": torch.tensor([1.0, 0.0])}, view, ("groups",
                                                                                            "process_rewards"))
    assert available["rewards_PG"].tolist() == [1.0, 0.0] and kept.step_rewards_E_T is None
    assert available["process_rewards_B_T"] is process


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from posttrain.policies import build_reward_model
    from posttrain.tasks import build_builtin_tokenizer

    out = tmp_path_factory.mktemp("prm")
    tokenizer = build_builtin_tokenizer("arithmetic")
    build_reward_model(path=None, preset="qwen2-tiny", tokenizer=tokenizer, seed=0, per_token=True).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def config(tmp_path, **process) -> dict:
    return {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"task": {"name": "arithmetic", "digits": 1, "operators": "+-", "train_size": 64, "eval_size": 4},
                 "max_length": 16},
        "train": {"max_steps": 1, "lr": 1e-4},
        "rl": {"prompts_per_step": 2, "group_size": 2, "sampling": {"max_new_tokens": 4},
               "process_reward": {"step_separator": ";", **process}},
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip


@pytest.mark.parametrize("refinement", ["clip", "delta", "none"])
def test_a_run_with_a_prm_logs_its_process_rewards_within_their_bounds(tmp_path, prm_dir, refinement):
    result = rl(config(tmp_path, path=prm_dir, refinement=refinement), progress=False)
    process = result.history[0]["rewards/process/mean"]
    # 4 new tokens hold at most 4 steps; clip's rewards are in [-0.5, 0], delta's return is p_1 - p_K in (-1, 1)
    low, high = {"clip": (-2.0, 0.0), "delta": (-1.0, 1.0), "none": (0.0, 4.0)}[refinement]
    assert low <= process <= high


def test_prime_needs_a_process_reward_and_a_prm_must_share_the_policys_tokenizer(tmp_path, prm_dir):
    import shutil

    from posttrain.api import as_config
    from posttrain.tasks import build_builtin_tokenizer

    raw = config(tmp_path, path=prm_dir)
    del raw["rl"]["process_reward"]
    with pytest.raises(ConfigError, match=r"rl\.advantage: 'prime' needs process rewards; set rl\.process_reward"):
        as_config(RLConfig, raw, ["rl.advantage=prime"])
    tokenizer = build_builtin_tokenizer("arithmetic")
    tokenizer.add_tokens(["<extra>"])  # one token more than the policy's
    tokenizer.save_pretrained(tmp_path / "other")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{prm_dir}/{name}", tmp_path / "other" / name)
    with pytest.raises(ValueError, match="has another tokenizer than the policy's"):
        rl(config(tmp_path, path=str(tmp_path / "other")), progress=False)


def test_an_implicit_prms_step_rewards_sum_its_tokens_beta_log_ratios(tmp_path):
    # two tiny causal LMs (the implicit PRM and its reference, other seeds); the expectation is read from each
    # model's whole logits: logp_t = log_softmax(logits_{t-1})[id_t], r_t = beta (logp_t - ref_logp_t), summed
    # over each step's tokens and put at the step's last token
    import torch.nn.functional as F

    from posttrain.policies.models import build_model
    from posttrain.rewards.process import ImplicitProcessRewardScorer
    from posttrain.tasks import build_builtin_tokenizer

    tokenizer = build_builtin_tokenizer("arithmetic")
    for name, seed in (("prm", 1), ("ref", 2)):
        build_model("qwen2-tiny", tokenizer, seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    scorer = ImplicitProcessRewardScorer(path=tmp_path / "prm", reference=tmp_path / "ref", tokenizer=tokenizer,
                                         step_separator=";", beta=0.5, coef=2.0, device=torch.device("cpu"))
    prompt = tokenizer("12+3=")["input_ids"]
    completion = tokenizer("2+3=5;1+0=1;15", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + completion])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(prompt) :] = True
    rewards = scorer(ids, torch.ones_like(mask), mask)

    with torch.no_grad():
        logp = [F.log_softmax(m(input_ids=ids).logits[0, :-1].double(), dim=-1).gather(1, ids[0, 1:, None])[:, 0]
                for m in (scorer.model, scorer.reference)]  # fmt: skip
    token_rewards = 0.5 * (logp[0] - logp[1])  # token_rewards[t - 1] is token t's
    separator = tokenizer.convert_tokens_to_ids(";")
    ends = [t for t in range(len(prompt), ids.shape[1]) if ids[0, t] == separator] + [ids.shape[1] - 1]
    expected, start = torch.zeros(ids.shape[1], dtype=torch.float64), len(prompt)
    for end in ends:
        expected[end] = 2.0 * token_rewards[start - 1 : end].sum()
        start = end + 1
    assert len(ends) == 3
    torch.testing.assert_close(rewards[0].double(), expected, atol=1e-5, rtol=1e-4)


def test_an_implicit_process_reward_needs_its_reference_and_takes_no_refinement(tmp_path):
    from posttrain.api import as_config

    raw = config(tmp_path, path="x", kind="implicit", refinement="none")
    with pytest.raises(ConfigError, match=r"rl\.process_reward\.reference: kind implicit"):
        as_config(RLConfig, raw)
    with pytest.raises(ConfigError, match=r"rl\.process_reward\.refinement: 'clip' refines a PRM's probabilities"):
        as_config(RLConfig, config(tmp_path, path="x", kind="implicit", reference="y"))
    assert as_config(RLConfig, config(tmp_path, path="x", kind="implicit", reference="y",
                                      refinement="none")).rl.process_reward.beta == 0.05  # fmt: skip


def test_a_run_with_an_implicit_prm_that_is_its_own_reference_gets_zero_process_rewards(tmp_path):
    # log pi/ref = 0 at every token when the implicit PRM is its reference: the run's process rewards are 0 exactly
    from posttrain.policies.models import build_model
    from posttrain.tasks import build_builtin_tokenizer

    tokenizer = build_builtin_tokenizer("arithmetic")
    build_model("qwen2-tiny", tokenizer, seed=1).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    lm = str(tmp_path / "lm")
    result = rl(config(tmp_path, path=lm, kind="implicit", reference=lm, refinement="none"), progress=False)
    assert result.history[0]["rewards/process/mean"] == 0.0
