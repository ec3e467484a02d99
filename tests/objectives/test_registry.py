"""The supply table: an objective's needs are read from its signature once, at registration, which refuses a
parameter no loop supplies and a `needs` that disagrees with the signature; a loop that fails to supply a
registered input gets an error, never a silent default."""

import pytest
import torch

from posttrain.objectives.registry import ObjectiveSignatureError, Registry, call_with

ADV = {"rewards_PG": None, "group_size": "groups", "baseline": "moving_baseline"}


def test_needs_are_read_from_the_signature() -> None:
    registry = Registry("advantage", inputs=ADV)

    @registry.register("centred")
    def centred(rewards_PG, baseline, *, group_size, scale=1.0):
        return scale * (rewards_PG - baseline)

    assert set(centred.needs) == {"moving_baseline", "groups"} and centred.inputs == ("rewards_PG", "baseline",
                                                                                       "group_size")  # fmt: skip


def test_a_positional_parameter_nothing_supplies_is_refused_at_registration() -> None:
    registry = Registry("advantage", inputs=ADV)
    with pytest.raises(ObjectiveSignatureError, match="'rewrds_PG' is not an input"):

        @registry.register("typo")
        def typo(rewrds_PG, *, group_size):
            return rewrds_PG

    assert "typo" not in registry


def test_declared_needs_must_agree_with_the_signature() -> None:
    registry = Registry("advantage", inputs=ADV)
    with pytest.raises(ObjectiveSignatureError, match="disagrees with its signature"):

        @registry.register("stale", needs=("groups",))
        def stale(rewards_PG, baseline):
            return rewards_PG - baseline

    @registry.register("kept", needs=("moving_baseline",))  # the earlier form, agreeing, still registers
    def kept(rewards_PG, baseline):
        return rewards_PG - baseline

    assert kept.needs == ("moving_baseline",)


def test_a_loop_that_does_not_supply_a_registered_input_is_an_error() -> None:
    registry = Registry("advantage", inputs=ADV)

    @registry.register("centred")
    def centred(rewards_PG, baseline):
        return rewards_PG - baseline

    rewards = torch.tensor([1.0, 0.0])
    with pytest.raises(TypeError, match="supplied no 'baseline'"):
        call_with(centred, {"rewards_PG": rewards})
    with pytest.raises(TypeError, match=r"\['scale'\] are not parameters"):
        call_with(centred, {"rewards_PG": rewards, "baseline": torch.tensor(0.5)}, {"scale": 2.0})
    torch.testing.assert_close(call_with(centred, {"rewards_PG": rewards, "baseline": torch.tensor(0.5)}),
                               torch.tensor([0.5, -0.5]))  # fmt: skip


def test_a_users_objective_from_a_plugin_file_goes_through_the_same_check(tmp_path) -> None:
    from posttrain.config import ConfigError, RLConfig, load_config

    (tmp_path / "mine.py").write_text(
        "from posttrain.objectives.registry import advantage\n"
        "@advantage('mine_with_a_typo')\n"
        "def mine(rewards_PG, basline):\n"
        "    return rewards_PG - basline\n"
    )
    with pytest.raises((ConfigError, ObjectiveSignatureError), match="basline"):
        load_config(RLConfig, None, [f"plugins=[{tmp_path / 'mine.py'}]", "rl.advantage=mine_with_a_typo"])
