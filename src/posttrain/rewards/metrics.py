"""What a step logs of its rewards: each reward's mean and std over the samples it applies to, failures, and the
verifier's accuracy."""

from __future__ import annotations

from torch import Tensor

from posttrain.rewards.scoring import RewardResult


def reward_metrics(rewards: RewardResult, verifier: str | None = None) -> dict[str, float]:
    """Mean and std (population; not-applicable samples skipped) of each reward and of the total, and
    `accuracy`: the share of completions that `verifier` (a reward's name, eval.reward) scores at least 1, among
    those it applies to (`verifier_scores`, `share_correct`); none without such a reward."""
    metrics: dict[str, float] = {}
    for name, scores_N in {**rewards.per_reward, "total": rewards.total}.items():
        applicable = scores_N[~scores_N.isnan()]
        metrics[f"rewards/{name}/mean"] = applicable.mean().item() if len(applicable) else float("nan")
        metrics[f"rewards/{name}/std"] = applicable.std(unbiased=False).item() if len(applicable) else float("nan")
    metrics |= {f"rewards/{name}/failures": float(n) for name, n in rewards.failures.items()}
    verdicts_N = verifier_scores(rewards, verifier)
    if verdicts_N is not None:
        metrics["accuracy"] = share_correct(verdicts_N)
    return metrics


def verifier_scores(rewards: RewardResult, verifier: str | None = None) -> Tensor | None:
    """The raw scores [N] of the reward named `verifier`, else of the only reward, else None: with several rewards
    the total is no verifier's verdict (a length penalty pulls it below 1, a format reward pushes it above)."""
    if verifier in rewards.per_reward:
        return rewards.per_reward[verifier]
    return next(iter(rewards.per_reward.values())) if len(rewards.per_reward) == 1 else None


def share_correct(scores_N: Tensor) -> float:
    """The share of scores of at least 1 (a verifier's "correct") among those that apply (not NaN); NaN for none."""
    applicable_N = scores_N[~scores_N.isnan()]
    return (applicable_N >= 1.0).float().mean().item() if len(applicable_N) else float("nan")
