"""RewardSet: weighted sums by hand, None handling, and every failure mode isolated and counted."""

import logging
import math
import threading
import time

import pytest
import torch

from posttrain.rewards import LoadedReward, RewardFailureError, RewardSet, RewardSpec

PROMPTS = ["p0", "p1", "p2", "p3"]
COMPLETIONS = ["a", "bb", "ccc", "dddd"]
IDS = [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def constant(values):
    def reward(*, completions, **kwargs):
        return list(values)

    return reward


def score(rewards, columns=None):
    return rewards.score(PROMPTS, COMPLETIONS, IDS, columns)


def test_weighted_sum_by_hand():
    rewards = RewardSet(
        [
            LoadedReward("a", constant([1.0, 0.0, 1.0, 0.0]), weight=2.0),
            LoadedReward("b", constant([0.5, 0.5, -1.0, 3.0]), weight=-1.0),
        ]
    )
    result = score(rewards)
    # total = 2 * a - b = [2 - 0.5, 0 - 0.5, 2 + 1, 0 - 3]
    torch.testing.assert_close(result.total, t([1.5, -0.5, 3.0, -3.0]))
    torch.testing.assert_close(result.per_reward["b"], t([0.5, 0.5, -1.0, 3.0]))  # raw, before weight
    assert result.failures == {"a": 0, "b": 0}
    # a: mean 0.5, population std 0.5; total: mean (1.5 - 0.5 + 3 - 3)/4 = 0.25
    assert result.metrics["rewards/a/mean"] == pytest.approx(0.5)
    assert result.metrics["rewards/a/std"] == pytest.approx(0.5)
    assert result.metrics["rewards/total/mean"] == pytest.approx(0.25)
    # total std: deviations 1.25, -0.75, 2.75, -3.25 -> squares 1.5625 + 0.5625 + 7.5625 + 10.5625 = 20.25
    # -> variance 20.25 / 4 = 5.0625 -> std 2.25
    assert result.metrics["rewards/total/std"] == pytest.approx(2.25)


def test_functions_get_columns_and_token_ids_like_trl():
    seen = {}

    def trl_style(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completion_ids=completion_ids, **kwargs)
        return [float(len(ids)) for ids in completion_ids]

    rewards = RewardSet([LoadedReward("len", trl_style)])
    result = rewards.score(PROMPTS, COMPLETIONS, IDS, {"answer": [1, 2, 3, 4]}, extra_kwargs={"step": 7})
    torch.testing.assert_close(result.total, t([1.0, 2.0, 3.0, 4.0]))
    assert seen == {"prompts": PROMPTS, "completion_ids": IDS, "answer": [1, 2, 3, 4], "step": 7}


def test_builtins_from_specs_end_to_end():
    rewards = RewardSet.from_specs(
        [
            RewardSpec("numeric_match"),
            RewardSpec("overlong_penalty", weight=0.5, args={"max_new_tokens": 4, "overlong_buffer": 2}),
        ]
    )
    result = rewards.score(["q"] * 3, ["4", "5", "x 4"], [[0], [0] * 3, [0] * 4], {"answer": ["4", "4", "4"]})
    # numeric: [1, 0, 1]; overlong (L_max - L_cache = 2): |y| 1 -> 0, 3 -> (2 - 3)/2 = -0.5, 4 -> -1
    # total = numeric + 0.5 * overlong = [1, -0.25, 0.5]
    torch.testing.assert_close(result.total, t([1.0, -0.25, 0.5]))


def test_none_is_not_applicable_adds_zero_and_is_not_a_failure():
    rewards = RewardSet(
        [
            LoadedReward("a", constant([None, 1.0, None, 3.0]), weight=2.0),
            LoadedReward("b", constant([1.0, 1.0, 1.0, 1.0])),
        ]
    )
    result = score(rewards)
    # total = 2 * [0, 1, 0, 3] + 1 = [1, 3, 1, 7]
    torch.testing.assert_close(result.total, t([1.0, 3.0, 1.0, 7.0]))
    assert torch.isnan(result.per_reward["a"]).tolist() == [True, False, True, False]
    assert result.failures["a"] == 0
    # mean over the applicable samples only: (1 + 3) / 2
    assert result.metrics["rewards/a/mean"] == pytest.approx(2.0)
    assert result.metrics["rewards/a/not_applicable"] == 2.0


def test_all_none_gives_nan_metrics_and_zero_total():
    result = score(RewardSet([LoadedReward("a", constant([None] * 4))]))
    torch.testing.assert_close(result.total, t([0.0] * 4))
    assert math.isnan(result.metrics["rewards/a/mean"])


@pytest.mark.parametrize(
    ("returned", "first_error"),
    [
        ([1.0, math.nan, 2.0, 3.0], "sample 1: nan is not a finite number"),
        ([1.0, 2.0, math.inf, 3.0], "sample 2: inf is not a finite number"),
        ([1.0, 2.0, 3.0, "4.0"], "sample 3: '4.0' is not a finite number"),
    ],
)
def test_bad_sample_scores_failure_score(returned, first_error, caplog):
    rewards = RewardSet([LoadedReward("r", constant(returned), failure_score=-1.0)])
    with caplog.at_level(logging.WARNING, logger="posttrain.rewards"):
        result = score(rewards)
    expected = [-1.0 if not isinstance(v, float) or not math.isfinite(v) else v for v in returned]
    torch.testing.assert_close(result.total, t(expected))
    assert result.failures == {"r": 1}
    assert rewards.failure_totals == {"r": 1}
    assert result.metrics["rewards/r/failures"] == 1.0
    assert f"reward 'r': 1 of 4 samples failed and scored failure_score=-1.0; first error: {first_error}" in (
        caplog.text
    )


def test_numbers_of_other_types_are_accepted():
    import numpy as np

    result = score(RewardSet([LoadedReward("r", constant([True, np.float32(0.5), torch.tensor(2.0), 3]))]))
    torch.testing.assert_close(result.total, t([1.0, 0.5, 2.0, 3.0]))
    tensor_out = score(RewardSet([LoadedReward("r", lambda **kw: torch.tensor([1.0, 2.0, 3.0, 4.0]))]))
    torch.testing.assert_close(tensor_out.total, t([1.0, 2.0, 3.0, 4.0]))


@pytest.mark.parametrize(
    ("fn", "first_error"),
    [
        (lambda **kw: 1 / 0, "ZeroDivisionError: division by zero"),
        (constant([1.0, 2.0]), "returned 2 scores, expected a list of 4 scores"),
        (lambda **kw: 1.0, "returned a float, expected a list of 4 scores"),
        (lambda **kw: None, "returned a NoneType, expected a list of 4 scores"),
    ],
)
def test_whole_call_failures_score_every_sample(fn, first_error, caplog):
    rewards = RewardSet(
        [LoadedReward("bad", fn, weight=2.0, failure_score=-0.5), LoadedReward("ok", constant([1.0] * 4))],
        max_failure_fraction=1.0,
    )
    with caplog.at_level(logging.WARNING, logger="posttrain.rewards"):
        result = score(rewards)
    # 2 * -0.5 + 1 = 0 for every sample
    torch.testing.assert_close(result.total, t([0.0] * 4))
    assert result.failures == {"bad": 4, "ok": 0}
    assert first_error in caplog.text


def test_raise_is_logged_with_its_traceback(caplog):
    def broken(**kwargs):
        raise KeyError("answer")

    rewards = RewardSet([LoadedReward("broken", broken)], max_failure_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="posttrain.rewards"):
        score(rewards)
    [record] = caplog.records
    assert record.exc_info is not None and record.exc_info[0] is KeyError


def test_timeout_scores_failure_score_for_the_whole_call():
    release = threading.Event()

    def hangs(**kwargs):
        release.wait(5.0)  # as a 5 s sleep, but the test lets it go once done
        return [9.0] * 4

    rewards = RewardSet(
        [
            LoadedReward("slow", hangs, timeout_s=0.2, failure_score=-2.0),
            LoadedReward("ok", constant([1.0] * 4)),
        ],
        max_failure_fraction=1.0,
    )
    start = time.perf_counter()
    result = score(rewards)
    elapsed = time.perf_counter() - start
    release.set()
    assert 0.2 <= elapsed < 2.0
    torch.testing.assert_close(result.per_reward["slow"], t([-2.0] * 4))
    torch.testing.assert_close(result.total, t([-1.0] * 4))  # -2 + 1
    assert result.failures == {"slow": 4, "ok": 0}
    assert rewards.failure_totals == {"slow": 4, "ok": 0}


def test_sleeping_5s_reward_times_out_after_0_2s():
    def sleeps(**kwargs):
        time.sleep(5)
        return [1.0] * 4

    rewards = RewardSet([LoadedReward("sleepy", sleeps, timeout_s=0.2)], max_failure_fraction=1.0)
    start = time.perf_counter()
    result = score(rewards)
    assert time.perf_counter() - start < 1.0
    assert result.failures == {"sleepy": 4}
    # the same set scores again at once: the hung worker was replaced, not queued behind
    rewards.rewards[0] = LoadedReward("sleepy", constant([1.0, 2.0, 3.0, 4.0]), timeout_s=0.2)
    torch.testing.assert_close(score(rewards).total, t([1.0, 2.0, 3.0, 4.0]))


def test_failure_fraction_stops_the_run_with_a_named_error():
    rewards = RewardSet(
        [LoadedReward("flaky", constant([math.nan, math.nan, math.nan, 1.0]))], max_failure_fraction=0.5
    )
    # 3 of 4 = 0.75 > 0.5
    with pytest.raises(RewardFailureError, match=r"'flaky': 3 of 4 samples failed in one call.*sample 0: nan"):
        score(rewards)


def test_failure_fraction_at_the_limit_is_allowed():
    rewards = RewardSet(
        [LoadedReward("flaky", constant([math.nan, math.nan, 1.0, 1.0]), failure_score=0.0)],
        max_failure_fraction=0.5,
    )
    # 2 of 4 = 0.5, not more than 0.5
    torch.testing.assert_close(score(rewards).total, t([0.0, 0.0, 1.0, 1.0]))


def test_a_raise_stops_the_run_under_the_default_fraction():
    rewards = RewardSet([LoadedReward("broken", lambda **kw: 1 / 0)])
    with pytest.raises(RewardFailureError, match=r"'broken': 4 of 4 .*ZeroDivisionError") as info:
        score(rewards)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_inline_call_without_timeout_runs_in_the_callers_thread():
    threads = []

    def record(**kwargs):
        threads.append(threading.current_thread())
        return [0.0] * 4

    score(RewardSet([LoadedReward("inline", record, timeout_s=None)]))
    score(RewardSet([LoadedReward("threaded", record, timeout_s=5.0)]))
    assert threads[0] is threading.current_thread()
    assert threads[1] is not threading.current_thread() and threads[1].daemon


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_sys_exit_in_a_reward_is_a_counted_failure(timeout_s):
    # inline (timeout_s=None) a SystemExit used to pass `except Exception` and end the trainer without a word
    def exits(*, completions, **kwargs):
        if "bb" in completions:  # the batch call and sample 1's own call exit; the other samples score
            raise SystemExit(3)
        return [float(len(c)) for c in completions]

    rewards = RewardSet([LoadedReward("exits", exits, timeout_s=timeout_s)], max_failure_fraction=0.5)
    result = score(rewards)
    torch.testing.assert_close(result.total, t([1.0, 0.0, 3.0, 4.0]))  # len("a"), failure_score, 3, 4
    assert result.failures == {"exits": 1}
    with pytest.raises(RewardFailureError, match=r"'exits': 4 of 4 .*SystemExit: 3"):
        score(RewardSet([LoadedReward("exits", lambda **kw: exit(3), timeout_s=timeout_s)]))


def test_keyboard_interrupt_in_an_inline_reward_still_stops_the_run():
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score(RewardSet([LoadedReward("ctrl_c", interrupted, timeout_s=None)]))


def test_a_reward_sees_its_call_deadline_and_cancel_event():
    from posttrain.rewards import current_reward_call

    seen = []

    def record(**kwargs):
        seen.append(current_reward_call())
        return [0.0] * 4

    before = time.monotonic()
    score(RewardSet([LoadedReward("timed", record, timeout_s=5.0)]))
    score(RewardSet([LoadedReward("inline", record, timeout_s=None)]))
    assert before + 5.0 <= seen[0].deadline <= time.monotonic() + 5.0
    assert seen[1].deadline is None and not seen[1].cancelled.is_set()
    assert current_reward_call() is None  # outside a call

    release = threading.Event()

    def hangs(**kwargs):
        seen.append(current_reward_call())
        release.wait(5.0)
        return [0.0] * 4

    score(RewardSet([LoadedReward("hangs", hangs, timeout_s=0.2)], max_failure_fraction=1.0))
    release.set()
    assert seen[2].cancelled.is_set()  # the RewardSet gave up on the call and told it so


@pytest.mark.parametrize(
    ("prompts", "ids", "columns", "message"),
    [
        (PROMPTS[:3], IDS, None, "3 prompts, 4 completions and 4 completion_ids"),
        (PROMPTS, IDS, {"answer": [1]}, "column 'answer' has 1 values for 4 completions"),
        (PROMPTS, IDS, {"completions": [1] * 4}, "column 'completions' clashes"),
    ],
)
def test_batch_shape_errors(prompts, ids, columns, message):
    rewards = RewardSet([LoadedReward("a", constant([0.0] * 4))])
    with pytest.raises(ValueError, match=message):
        rewards.score(prompts, COMPLETIONS, ids, columns)


def test_reward_named_total_is_rejected():
    with pytest.raises(ValueError, match="named 'total'"):
        RewardSet([LoadedReward("total", constant([0.0] * 4))])


# ---------------------------------------------------------------- a raise is isolated to the samples that cause it


def raises_on_boom(*, completions, **kwargs):
    """Scores len(completion), batch-wise: one completion holding "boom" makes the whole call raise."""
    if any("boom" in c for c in completions):
        raise ValueError("boom")
    return [float(len(c)) for c in completions]


def test_one_sample_that_makes_the_call_raise_fails_alone(caplog):
    rewards = RewardSet([LoadedReward("lengths", raises_on_boom, failure_score=-1.0)])  # default fraction 0.5
    with caplog.at_level(logging.WARNING, logger="posttrain.rewards"):
        result = rewards.score(PROMPTS, ["a", "a boom", "ccc", "dddd"], IDS)
    # the batch call raised; alone, samples 0, 2, 3 score their lengths and sample 1 scores failure_score
    torch.testing.assert_close(result.total, t([1.0, -1.0, 3.0, 4.0]))
    assert result.failures == {"lengths": 1} and rewards.failure_totals == {"lengths": 1}
    assert result.metrics["rewards/lengths/failures"] == 1.0
    [record] = caplog.records
    assert record.getMessage() == (
        "reward 'lengths': 1 of 4 samples failed and scored failure_score=-1.0; first error: sample 1: "
        "ValueError: boom (the call on all 4 raised ValueError: boom; each sample was then called alone)"
    )
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_per_sample_calls_get_their_own_slice_of_every_column_and_the_shared_kwargs():
    seen = []

    def batch_shy(*, prompts, completions, completion_ids, answer, step, **kwargs):
        seen.append((prompts, completions, completion_ids, answer, step))
        if len(completions) > 1:
            raise RuntimeError("cannot batch")
        return [float(answer[0])]

    rewards = RewardSet([LoadedReward("shy", batch_shy, timeout_s=None)])
    result = rewards.score(PROMPTS, COMPLETIONS, IDS, {"answer": [5, 6, 7, 8]}, extra_kwargs={"step": 3})
    # every sample scored on its own call: no failure, the scores are the answers
    torch.testing.assert_close(result.total, t([5.0, 6.0, 7.0, 8.0]))
    assert result.failures == {"shy": 0}
    assert seen[2] == (["p1"], ["bb"], [[1, 2]], [6], 3)
    assert len(seen) == 5  # the batch call, then one per sample


def test_a_function_that_always_raises_stops_calling_once_the_run_must_stop():
    calls = []

    def broken(*, completions, **kwargs):
        calls.append(len(completions))
        raise KeyError("answer")

    rewards = RewardSet([LoadedReward("broken", broken)], max_failure_fraction=0.5)
    completions = [f"c{i}" for i in range(8)]
    with pytest.raises(RewardFailureError, match=r"'broken': 8 of 8 samples failed.*sample 0: KeyError"):
        rewards.score(completions, completions, [[1]] * 8)
    # batch call, then samples 0..4: 5 failures > 0.5 * 8 stops the pass; samples 5..7 are not called
    assert calls == [8, 1, 1, 1, 1, 1]


def test_a_hanging_sample_uses_up_the_pass_and_the_rest_are_not_called(caplog):
    release = threading.Event()
    calls = []

    def hangs_on_b(*, completions, **kwargs):
        calls.append(list(completions))
        if len(completions) > 1:
            raise ValueError("batch")
        if completions[0] == "bb":
            release.wait(5.0)
        return [1.0]

    rewards = RewardSet([LoadedReward("h", hangs_on_b, timeout_s=0.5)], max_failure_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="posttrain.rewards"):
        result = rewards.score(PROMPTS, COMPLETIONS, IDS)
    release.set()
    # sample 0 scores; sample 1 hangs until the pass's 0.5 s are gone; samples 2, 3 are never called
    assert calls == [COMPLETIONS, ["a"], ["bb"]]
    torch.testing.assert_close(result.total, t([1.0, 0.0, 0.0, 0.0]))
    assert result.failures == {"h": 3}
    assert caplog.messages[0].startswith(
        "reward 'h': 3 of 4 samples failed and scored failure_score=0.0; first error: sample 1: TimeoutError: "
        "no result within"
    )


def test_a_timeout_of_the_batch_call_is_not_retried_per_sample():
    release = threading.Event()
    calls = []

    def hangs(*, completions, **kwargs):
        calls.append(len(completions))
        release.wait(5.0)
        return [1.0] * len(completions)

    rewards = RewardSet([LoadedReward("slow", hangs, timeout_s=0.2)], max_failure_fraction=1.0)
    result = rewards.score(PROMPTS, COMPLETIONS, IDS)
    release.set()
    assert calls == [4] and result.failures == {"slow": 4}
