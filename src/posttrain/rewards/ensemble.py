"""An ensemble of K rewards (usually K reward models) scored as one conservative reward.

Recipe: `{fn: ensemble, args: {members: [{fn: reward_model, args: {path: rm1}}, ...], mode: mean_minus_std,
lam: 1.0}}`. Members are specs without weight (`fn`, optional `args` and `name`), loaded like any reward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import torch

from posttrain.objectives.reward_model import EnsembleMode, ensemble_score
from posttrain.rewards.loading import load_reward_fn

ENSEMBLE_MODES: tuple[str, ...] = get_args(EnsembleMode)
_MEMBER_KEYS = frozenset({"fn", "args", "name"})


class EnsembleReward:
    """Calls each member with the same inputs and combines their scores with
    `posttrain.objectives.reward_model.ensemble_score` (Coste et al. 2023, arXiv:2310.02743): `mode` is
    mean, min (worst-case optimisation), mean_minus_var (uncertainty-weighted optimisation, the paper's
    UWO) or mean_minus_std (UWO with the standard deviation, so `lam` is in reward units).

    A sample that any member finds not applicable (None) is not applicable to the ensemble. A member
    that raises or returns the wrong number of scores fails the whole ensemble call, which `RewardSet`
    counts as that reward's failure.
    """

    __name__ = "ensemble"

    def __init__(
        self,
        *,
        members: Sequence[Mapping[str, Any]],
        mode: EnsembleMode = "mean",
        lam: float = 1.0,
        base_dir: str | Path | None = None,
    ):
        if mode not in ENSEMBLE_MODES:
            raise ValueError(f"reward 'ensemble': mode '{mode}' is not known; known: {', '.join(ENSEMBLE_MODES)}")
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"reward 'ensemble': lam must be a finite number >= 0, got {lam!r}")
        if len(members) < 1:
            raise ValueError("reward 'ensemble': members must list at least one reward spec")
        self.members = [_load_member(i, member, base_dir) for i, member in enumerate(members)]
        self.member_names = [str(member.get("name") or member["fn"]) for member in members]
        self.mode = mode
        self.lam = lam

    def __call__(self, *, completions: list[Any], **kwargs: Any) -> list[float | None]:
        n = len(completions)
        outputs = [self._call_member(k, n, completions, kwargs) for k in range(len(self.members))]
        missing_N = torch.tensor([any(out[i] is None for out in outputs) for i in range(n)], dtype=torch.bool)
        scores_K_N = torch.tensor(
            [[math.nan if v is None else float(v) for v in out] for out in outputs], dtype=torch.float64
        )
        combined_N = ensemble_score(scores_K_N, mode=self.mode, lam=self.lam)
        return [None if missing else value for missing, value in zip(missing_N.tolist(), combined_N.tolist())]

    def _call_member(self, k: int, n: int, completions: list[Any], kwargs: dict[str, Any]) -> list[Any]:
        out = list(self.members[k](completions=completions, **kwargs))
        if len(out) != n:
            raise ValueError(
                f"ensemble member {k} ('{self.member_names[k]}') returned {len(out)} scores for {n} completions"
            )
        return out


def _load_member(index: int, member: Mapping[str, Any], base_dir: str | Path | None) -> Any:
    if not isinstance(member, Mapping) or "fn" not in member or not set(member) <= _MEMBER_KEYS:
        raise ValueError(
            f"reward 'ensemble': member {index} must be a mapping with 'fn' and optional 'args', 'name' "
            f"(weights belong to the ensemble, not its members), got {member!r}"
        )
    return load_reward_fn(member["fn"], member.get("args"), base_dir)
