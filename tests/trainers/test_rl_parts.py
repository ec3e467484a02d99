"""DAPO's dynamic sampling (`keep_informative_groups`): which groups it keeps, how many draws it makes."""

import pytest
import torch

from posttrain.data.encoding import PromptTokens
from posttrain.rewards import RewardResult
from posttrain.rollout import Rollouts
from posttrain.rollout.groups import Scored, keep_informative_groups


def scored(prompt_names: list[str], rewards_P_G: list[list[float]]) -> Scored:
    """P prompts x G completions; completion j of prompt i is the token list [i, j]."""
    g = len(rewards_P_G[0])
    rows = [[i, j] for i in range(len(prompt_names)) for j in range(g)]
    rollouts = Rollouts(
        prompt_ids=[[100 + i] for i in range(len(prompt_names))],
        completion_ids=rows,
        logprobs=[torch.zeros(2) for _ in rows],
        finish_reasons=["stop"] * len(rows),
        group_size=g,
    )
    total = torch.tensor([r for group in rewards_P_G for r in group])
    rewards = RewardResult(total=total, per_reward={"r": total.clone()}, failures={"r": 0}, metrics={})
    prompts = [PromptTokens([100 + i], name, {}) for i, name in enumerate(prompt_names)]
    return Scored(prompts, rollouts, rewards, gen_s=1.0, score_s=0.5)


def test_keeps_only_groups_whose_rewards_differ_and_draws_until_it_has_enough():
    draws = iter([
        scored(["a", "b", "c"], [[1, 1], [0, 1], [0, 0]]),  # b is informative; a and c are dropped
        scored(["d", "e", "f"], [[1, 0], [1, 0], [0, 1]]),  # d and e complete the three; f is not needed
    ])  # fmt: skip
    kept = keep_informative_groups(lambda: next(draws), num_groups=3, max_batches=5)
    assert [p.where for p in kept.prompts] == ["b", "d", "e"]
    assert kept.rewards.total.tolist() == [0, 1, 1, 0, 1, 0]
    # completions travel with their group: b is prompt 1 of draw 1, d and e prompts 0 and 1 of draw 2
    assert kept.rollouts.completion_ids == [[1, 0], [1, 1], [0, 0], [0, 1], [1, 0], [1, 1]]
    assert kept.rollouts.prompt_ids == [[101], [100], [101]]
    assert kept.dropped_groups == 2  # a and c; f was never examined as dropped
    assert (kept.gen_s, kept.score_s) == (2.0, 1.0)  # the time of both draws


def test_stops_after_max_batches_and_trains_on_what_it_kept():
    draws = iter([scored(["a", "b"], [[1, 1], [0, 1]]), scored(["c", "d"], [[0, 0], [0, 0]])])
    kept = keep_informative_groups(lambda: next(draws), num_groups=2, max_batches=2)
    assert [p.where for p in kept.prompts] == ["b"]
    assert kept.dropped_groups == 3


def test_with_nothing_informative_the_last_draw_is_used():
    draws = iter([scored(["a"], [[1, 1]]), scored(["b"], [[0, 0]])])
    kept = keep_informative_groups(lambda: next(draws), num_groups=1, max_batches=2)
    assert [p.where for p in kept.prompts] == ["b"]
    assert kept.dropped_groups == 2


def test_critic_values_on_real_tokens_do_not_depend_on_dropping_the_right_padding_mask():
    from posttrain.policies import ValueModel, build_model
    from posttrain.tasks import build_builtin_tokenizer

    tokenizer = build_builtin_tokenizer("arithmetic")
    critic = ValueModel(build_model("qwen2-tiny", tokenizer, seed=0))
    torch.nn.init.normal_(critic.head.weight)  # a zero head would make every value 0
    ids_B_T = torch.randint(3, len(tokenizer), (3, 7))
    attn_B_T = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], dtype=torch.bool)
    fast_B_T = critic(ids_B_T, attn_B_T)  # right padding only: runs without the mask
    hidden = critic.backbone(input_ids=ids_B_T, attention_mask=attn_B_T, use_cache=False).last_hidden_state
    plain_B_T = torch.cat([torch.zeros(3, 1), critic.head(hidden).squeeze(-1)[:, :-1]], dim=1)
    real_B_T = torch.cat([torch.ones(3, 1, dtype=torch.bool), attn_B_T[:, :-1]], dim=1)  # value t reads t - 1
    torch.testing.assert_close(fast_B_T[real_B_T], plain_B_T[real_B_T])


def test_accuracy_is_the_verifiers_not_the_total() -> None:
    # numeric_match [1, 0] beside a length penalty: totals [0.995, -0.005] gave accuracy 0 (audit); the verifier's
    # own column gives 1/2. A not-applicable sample (NaN) is left out; two rewards, neither the verifier: none
    from posttrain.rewards.metrics import reward_metrics

    def result(per_reward: dict[str, list[float]]) -> RewardResult:
        columns = {name: torch.tensor(v) for name, v in per_reward.items()}
        total = sum(c.nan_to_num(nan=0.0) for c in columns.values())
        return RewardResult(total=total, per_reward=columns, failures=dict.fromkeys(columns, 0), metrics={})

    shaped = result({"numeric_match": [1.0, 0.0], "length_penalty": [-0.005, -0.005]})
    assert reward_metrics(shaped, verifier="numeric_match")["accuracy"] == 0.5
    assert reward_metrics(result({"numeric_match": [1.0, float("nan"), 0.0, 1.0]}))["accuracy"] == pytest.approx(2 / 3)
    assert "accuracy" not in reward_metrics(shaped, verifier="exact_match")


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "remax", "reinforce", "reinforce_pp"])
def test_kl_in_the_reward_shapes_what_every_estimator_reads(advantage: str) -> None:
    from posttrain.objectives import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
    from posttrain.policies import FrozenCopy, build_model
    from posttrain.rollout import ENGINES, SamplingParams
    from posttrain.tasks import build_builtin_tokenizer
    from posttrain.trainers.rl import Objectives, prepare_step

    tokenizer = build_builtin_tokenizer("arithmetic")
    policy, other = (build_model("qwen2-tiny", tokenizer, seed=s).eval() for s in (0, 1))
    prompts = [tokenizer(p).input_ids for p in ("2+2=", "13+5=")]
    params = SamplingParams(max_new_tokens=4, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,))
    rollouts = ENGINES["native"].generate(policy, prompts, params, n=4, generator=torch.Generator().manual_seed(0))
    padded = rollouts.to_padded(tokenizer.pad_token_id, "cpu")
    rewards_PG = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    # k1 per sequence from the reference's own forward: sum over completion tokens of log pi_old - log ref
    with torch.no_grad():
        ref_logits = other(input_ids=padded.input_ids_B_T, attention_mask=padded.attention_mask_B_T.long()).logits
    ref_logp_B_T = torch.zeros_like(padded.old_logp_B_T)
    ref_logp_B_T[:, 1:] = ref_logits[:, :-1].log_softmax(-1).gather(2, padded.input_ids_B_T[:, 1:, None])[..., 0]
    kl_PG = torch.where(padded.loss_mask_B_T, padded.old_logp_B_T - ref_logp_B_T, 0.0).sum(dim=1)
    objectives = Objectives(
        ADVANTAGES[advantage], POLICY_LOSSES["ppo"], AGGREGATIONS["token_mean"], KL_ESTIMATORS["k1"]
    )
    available = {"rewards_PG": rewards_PG, "group_size": 4, "greedy_rewards_P": torch.zeros(2),
                 "baseline": torch.tensor(0.5)}  # fmt: skip
    advantages = []
    for coef in (0.05, 50.0):
        tensors, _ = prepare_step(padded, available, objectives, advantage_args={}, reference=FrozenCopy(other),
                                  critic=None, kl_coef=coef, kl_in_reward=True, temperature=1.0,
                                  micro_batch_size=None)  # fmt: skip
        torch.testing.assert_close(tensors.rewards_PG, rewards_PG - coef * kl_PG, atol=1e-4, rtol=1e-4)
        advantages.append(tensors.adv_B_T)
    assert not torch.allclose(advantages[0], advantages[1], atol=1e-3)


def test_filtration_weights_are_the_authors_three():
    from posttrain.rollout.groups import filtration_weights

    # rewards [1, -2, 0.5, 0] (+ 1e-8 each):
    #   pow 2:       1, 4, 0.25, 0
    #   max_min:     the step's max (1) and min (-2) weigh 1, the rest 0
    #   max_random:  the max 0.4, the rest 0.1
    rewards = torch.tensor([1.0, -2.0, 0.5, 0.0])
    for method, expected in (("pow", [1.0, 4.0, 0.25, 0.0]), ("max_min", [1.0, 1.0, 0.0, 0.0]),
                             ("max_random", [0.4, 0.1, 0.1, 0.1])):  # fmt: skip
        weights = filtration_weights(rewards, method=method)
        torch.testing.assert_close(weights, torch.tensor(expected) + 1e-8)
    with pytest.raises(ValueError, match=r"rl\.filtration\.method"):
        filtration_weights(rewards, method="best_of_n")
