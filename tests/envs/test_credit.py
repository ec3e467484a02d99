"""Credit on episodes: every registered estimator and the PPO loss run unchanged on multi-turn episodes (a split
one included), advantages live on model tokens only, the critic is trained on model tokens only, and per-turn
environment rewards add up with the outcome."""

import pytest
import torch
from tests.envs.scripted import ScriptedEngine
from tests.envs.test_driver import Replies

from posttrain.envs import run_episodes
from posttrain.objectives import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from posttrain.policies import ValueModel
from posttrain.rollout import SamplingParams
from posttrain.trainers.rl import EpisodeView, Objectives, UpdateStats, prepare_step, update_minibatch

PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0)
ROWS = [{"prompt_ids": [1, 2]}, {"prompt_ids": [3]}]


def episodes():
    """2 prompts x 2 episodes: episode 0 splits after its first turn, episode 1 gives per-turn rewards."""
    envs = [Replies(turns=2, split_after=1), Replies(turns=2, rewards=[0.25, 0.5]), Replies(turns=1),
            Replies(turns=3, obs=(9, 9))]  # fmt: skip
    return run_episodes(ScriptedEngine(lambda context: [5, 6, 7]), None, envs, ROWS, PARAMS, n=2)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_every_estimator_runs_on_episodes_and_credits_model_tokens_only(name, tiny_qwen2):
    rollouts = episodes()
    assert rollouts.is_split
    model = tiny_qwen2.train()
    rows, layout = rollouts.to_training_rows(pad_id=0)
    outcome_PG = torch.tensor([1.0, 0.0, 0.5, 2.0])
    rewards_PG = outcome_PG + torch.tensor(rollouts.env_rewards())  # the env's 0.25 + 0.5 on episode 1
    objectives = Objectives(ADVANTAGES[name], POLICY_LOSSES["ppo"], AGGREGATIONS["token_mean"], KL_ESTIMATORS["k3"])
    critic = ValueModel(model) if "critic" in objectives.advantage.needs else None
    available = {"rewards_PG": rewards_PG, "group_size": 2, "greedy_rewards_P": torch.tensor([0.5, 0.5]),
                 "baseline": torch.tensor(0.3)}  # fmt: skip
    view = EpisodeView.of(rollouts, 0, torch.device("cpu"), layout, rows)
    args = {"reward_min": 0.0, "reward_max": 3.0} if name == "bnpo" else {}  # its range holds the env's rewards
    tensors, _ = prepare_step(rows, available, objectives, advantage_args=args, reference=None, critic=critic,
                              kl_coef=0.0, kl_in_reward=False, temperature=1.0, micro_batch_size=None,
                              episodes=view)  # fmt: skip
    mask = rows.loss_mask_B_T
    assert tensors.adv_B_T.shape == mask.shape and torch.isfinite(tensors.adv_B_T).all()
    assert (tensors.adv_B_T[~mask] == 0).all()  # prompt, environment and padding tokens get no credit
    if critic is not None:
        assert (tensors.old_values_B_T[~mask] == 0).all() and (tensors.returns_B_T[~mask] == 0).all()
    stats = UpdateStats()
    update_minibatch(model, critic, tensors, torch.arange(len(mask)), policy_loss=objectives.policy_loss,
                     policy_loss_args={}, aggregation=objectives.aggregation, kl_estimator=None, kl_coef_in_loss=0.0,
                     entropy_coef=0.0, value_coef=0.5, value_clip_range=0.2, temperature=1.0, max_len=8,
                     micro_batch_size=2, stats=stats)  # fmt: skip
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    if critic is not None:
        assert all(torch.isfinite(p.grad).all() for p in critic.parameters() if p.grad is not None)


def test_grpo_gives_every_sample_of_a_split_episode_its_episodes_advantage(tiny_qwen2):
    rollouts = episodes()
    rows, layout = rollouts.to_training_rows(pad_id=0)
    assert layout.episode_of_B.tolist() == [0, 0, 1, 2, 3]  # episode 0 became two rows
    objectives = Objectives(ADVANTAGES["grpo"], POLICY_LOSSES["ppo"], AGGREGATIONS["token_mean"], KL_ESTIMATORS["k3"])
    view = EpisodeView.of(rollouts, 0, torch.device("cpu"), layout, rows)
    rewards_PG = torch.tensor([1.0, 0.0, 0.5, 2.0])
    tensors, _ = prepare_step(rows, {"rewards_PG": rewards_PG, "group_size": 2}, objectives, advantage_args={},
                              reference=None, critic=None, kl_coef=0.0, kl_in_reward=False, temperature=1.0,
                              micro_batch_size=None, episodes=view)  # fmt: skip
    # groups [1, 0] and [0.5, 2]: (r - mean) / (unbiased std + 1e-4); std = 0.707107 and 1.060660
    expected = [0.5 / (0.5**0.5 + 1e-4), -0.5 / (0.5**0.5 + 1e-4), -0.75 / (1.125**0.5 + 1e-4),
                0.75 / (1.125**0.5 + 1e-4)]  # fmt: skip
    for b, episode in enumerate(layout.episode_of_B.tolist()):
        values = tensors.adv_B_T[b][rows.loss_mask_B_T[b]]
        torch.testing.assert_close(values, torch.full_like(values, expected[episode]))


def test_per_turn_rewards_and_the_outcome_sum_to_the_return_on_each_token():
    rollouts = episodes()
    rows, layout = rollouts.to_training_rows(pad_id=0)
    view = EpisodeView.of(rollouts, 0, torch.device("cpu"), layout, rows)
    objectives = Objectives(ADVANTAGES["reinforce_pp"], POLICY_LOSSES["ppo"], AGGREGATIONS["token_mean"],
                            KL_ESTIMATORS["k3"])  # fmt: skip
    seen = {}

    def capture(token_rewards_B_T, mask_B_T):
        seen["token_rewards"], seen["mask"] = token_rewards_B_T, mask_B_T
        return torch.zeros(mask_B_T.shape[0])

    capture.inputs, capture.needs, capture.name = ("token_rewards_B_T", "mask_B_T"), (), "capture"
    objectives = Objectives(capture, *list(vars(objectives).values())[1:])
    # episode 1: env rewards 0.25 (turn 0) and 0.5 (turn 1), outcome 1.0 -> its total reward is 1.75
    prepare_step(rows, {"rewards_PG": torch.tensor([0.0, 1.75, 0.0, 0.0]), "group_size": 2}, objectives,
                 advantage_args={}, reference=None, critic=None, kl_coef=0.0, kl_in_reward=False, temperature=1.0,
                 micro_batch_size=None, episodes=view)  # fmt: skip
    # episode 1's completion [5, 6, 7, 9, 5, 6, 7] after its 2-token prompt: turn ends at columns 4 and 8
    assert seen["token_rewards"][1, :9].tolist() == [0, 0, 0, 0, 0.25, 0, 0, 0, 1.5]
    assert seen["token_rewards"][1].sum().item() == pytest.approx(1.75)


def test_a_split_episodes_rows_get_their_episodes_group_rewards(tiny_qwen2):
    rollouts = episodes()
    rows, layout = rollouts.to_training_rows(pad_id=0)
    rewards_PG = torch.tensor([1.0, 0.0, 0.5, 0.25])
    objectives = Objectives(ADVANTAGES["grpo"], POLICY_LOSSES["nft"], AGGREGATIONS["token_mean"], KL_ESTIMATORS["k3"])
    view = EpisodeView.of(rollouts, 0, torch.device("cpu"), layout, rows)
    tensors, _ = prepare_step(rows, {"rewards_PG": rewards_PG, "group_size": 2}, objectives, advantage_args={},
                              reference=None, critic=None, kl_coef=0.0, kl_in_reward=False, temperature=1.0,
                              micro_batch_size=None, episodes=view)  # fmt: skip
    episode_B = layout.episode_of_B
    assert len(episode_B) > len(rewards_PG)  # some episode became several rows
    assert torch.equal(tensors.row_inputs["rewards_B"], rewards_PG[episode_B])
    group_means = torch.tensor([0.5, 0.5, 0.375, 0.375])
    assert torch.equal(tensors.row_inputs["group_mean_rewards_B"], group_means[episode_B])
