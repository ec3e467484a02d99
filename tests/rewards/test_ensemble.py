"""Ensembles of rewards: the combinations of Coste et al. 2023 by hand, and use as one reward."""

import pytest
import torch

from posttrain.rewards import RewardLoadError, RewardSet, RewardSpec
from posttrain.rewards.ensemble import EnsembleReward

MEMBERS_FILE = """
def rm_a(completions, **kwargs):
    return [1.0, 2.0, None][: len(completions)]


def rm_b(completions, **kwargs):
    return [3.0, 2.0, 5.0][: len(completions)]


def rm_c(completions, **kwargs):
    return [2.0, 2.0, 0.0][: len(completions)]


def too_few(completions, **kwargs):
    return [1.0]
"""


def t(values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.fixture
def members(tmp_path):
    (tmp_path / "members.py").write_text(MEMBERS_FILE)
    return tmp_path, [{"fn": "members.py:rm_a"}, {"fn": "members.py:rm_b"}, {"fn": "members.py:rm_c"}]


# Members score sample 0 as (1, 3, 2) and sample 1 as (2, 2, 2); rm_a finds sample 2 not applicable.
# Sample 0: mean 2, deviations (-1, 1, 0), population variance 2/3, std sqrt(2/3) = 0.816497.
@pytest.mark.parametrize(
    ("mode", "lam", "expected"),
    [
        ("mean", 1.0, [2.0, 2.0, None]),
        ("min", 1.0, [1.0, 2.0, None]),
        ("mean_minus_var", 0.5, [2.0 - 0.5 * 2 / 3, 2.0, None]),  # Coste et al.'s UWO
        ("mean_minus_std", 0.5, [2.0 - 0.5 * 0.816497, 2.0, None]),  # no disagreement on sample 1: no penalty
    ],
)
def test_modes_by_hand(members, mode, lam, expected):
    base_dir, specs = members
    ensemble = EnsembleReward(members=specs, mode=mode, lam=lam, base_dir=base_dir)
    scores = ensemble(prompts=["p"] * 3, completions=["x", "y", "z"], completion_ids=[[1]] * 3)
    assert scores[2] is None
    assert scores[:2] == pytest.approx(expected[:2], abs=1e-6)


def test_unknown_mode(members):
    base_dir, specs = members
    with pytest.raises(ValueError, match="mode 'median' is not known; known: mean, min"):
        EnsembleReward(members=specs, mode="median", base_dir=base_dir)


def test_ensemble_as_one_reward_from_a_spec(members):
    base_dir, specs = members
    rewards = RewardSet.from_specs(
        [RewardSpec("ensemble", weight=2.0, args={"members": specs, "mode": "mean_minus_std", "lam": 1.0})],
        base_dir=base_dir,
    )
    result = rewards.score(["p"] * 3, ["x", "y", "z"], [[1]] * 3)
    # sample 0: (1, 3, 2) -> 2 - 0.816497 = 1.183503; sample 1: (2, 2, 2) -> 2;
    # sample 2: rm_a returned None -> not applicable -> NaN raw, 0 in the total
    raw = result.per_reward["ensemble"]
    torch.testing.assert_close(raw[:2], t([1.183503, 2.0]))
    assert torch.isnan(raw[2])
    torch.testing.assert_close(result.total, t([2 * 1.183503, 4.0, 0.0]))
    assert result.failures == {"ensemble": 0}


def test_a_broken_member_fails_the_ensemble_call(tmp_path):
    (tmp_path / "members.py").write_text(MEMBERS_FILE)
    ensemble = EnsembleReward(members=[{"fn": "members.py:rm_b"}, {"fn": "members.py:too_few"}], base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"member 1 \('members.py:too_few'\) returned 1 scores for 2 completions"):
        ensemble(prompts=["p", "p"], completions=["x", "y"], completion_ids=[[1], [1]])


def test_member_specs_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"member 0 must be a mapping with 'fn'.*weights belong to the ensemble"):
        EnsembleReward(members=[{"fn": "exact_match", "weight": 2.0}])
    with pytest.raises(ValueError, match="at least one"):
        EnsembleReward(members=[])
    with pytest.raises(RewardLoadError, match=r"'nope\.py:f': file 'nope\.py' not found"):
        EnsembleReward(members=[{"fn": "nope.py:f"}], base_dir=tmp_path)
