"""Score a batch with a weighted set of rewards, each isolated so that one bad reward cannot crash a run.

    total_N = sum_k weight_k * r_k_N      (a None, "not applicable", adds 0, as TRL's nansum does)

Isolation, per reward call:
- returns NaN, +-inf or a non-number for a sample: that sample scores `failure_score`;
- raises: the function is called again once per sample, so that only the samples whose own call
  raises (or times out, or returns a bad score) score `failure_score`; one odd completion that makes a
  batch-wise function raise does not fail the whole batch. The cost is bounded: the per-sample pass
  as a whole gets the call's `timeout_s` (samples it does not reach fail), and it stops calling once
  more samples have failed than `max_failure_fraction` allows, since the run stops then anyway;
- returns the wrong number of scores, or exceeds `timeout_s`: every sample of the call scores
  `failure_score` (a call that hangs is not retried sample by sample, which could hang N times).
Failures are counted (`RewardResult.failures`, cumulative in `RewardSet.failure_totals`) and logged
on the "posttrain.rewards" logger. If more than `max_failure_fraction` of one call's samples fail,
`RewardFailureError` stops the run, since a reward that is mostly broken would otherwise train the
policy on `failure_score`. Note that a timeout or a wrong count fails all of the call's samples, so
below 1.0 either stops the run; `max_failure_fraction=1.0` tolerates them all.

Time limits: with `timeout_s` set, the call runs on a daemon worker thread and the caller waits at
most `timeout_s`. Python cannot kill a thread, so a call that hangs is abandoned: its thread keeps
running in the background (as a daemon it does not block interpreter exit), its result is dropped,
and the next call gets a fresh worker. Untrusted or crash-prone code belongs in a subprocess, which
the code sandbox (`posttrain.rewards.sandbox`) provides. With `timeout_s=None` the call runs inline
in the caller's thread, with no hand-off at all; a `sys.exit()` in it fails the call like any other
exception (only KeyboardInterrupt goes through, so Ctrl-C still stops the run).

A reward that can bound its own work reads `current_reward_call()`: the deadline by which its call
must return and an event set once the caller has abandoned it (the code reward uses both, so that its
sandboxes end with the call).
"""

from __future__ import annotations

import inspect
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.rewards.base import RewardFailureError, RewardLoadError, RewardSpec
from posttrain.rewards.loading import default_reward_name, load_reward_fn

logger = logging.getLogger("posttrain.rewards")

_RESERVED_KWARGS = frozenset({"prompts", "completions", "completion_ids"})


@dataclass(frozen=True)
class LoadedReward:
    """A reward callable with the spec fields that govern how it is called and weighted."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0
    timeout_s: float | None = 30.0
    failure_score: float = 0.0


@dataclass
class RewardResult:
    """The scores of one batch of N completions."""

    total: torch.Tensor
    """[N] float32: sum over rewards of weight * score, a None score adding 0."""
    per_reward: dict[str, torch.Tensor]
    """name -> [N] float32 raw scores before weighting; NaN where the reward returned None."""
    failures: dict[str, int]
    """name -> number of samples that scored `failure_score` in this batch."""
    metrics: dict[str, float]
    """`rewards/<name>/{mean,std,failures,not_applicable,seconds}` and `rewards/total/{mean,std}`.
    Means and standard deviations (population) skip not-applicable samples."""


@dataclass
class _CallOutcome:
    scores: list[float]  # N; NaN = not applicable; failed samples already hold failure_score
    failed: int
    first_error: str | None
    exception: BaseException | None
    seconds: float
    batch_error: str | None = None  # the whole-batch call raised this; samples were then scored one by one


@dataclass(frozen=True)
class RewardCall:
    """What a reward function may know about the call that runs it (`current_reward_call()`)."""

    deadline: float | None
    """`time.monotonic()` by which the call must return (its timeout_s); None when it has no limit."""
    cancelled: threading.Event
    """Set when the caller stopped waiting (the call passed its timeout_s): stop working and return."""


_current = threading.local()


def current_reward_call() -> RewardCall | None:
    """The RewardSet (or `call_within`) call running in this thread; None outside one."""
    return getattr(_current, "call", None)


def _call_as(fn: Callable[..., Any], kwargs: dict[str, Any], call: RewardCall) -> Any:
    previous = current_reward_call()
    _current.call = call
    try:
        return fn(**kwargs)
    finally:
        _current.call = previous


class _Timeout(TimeoutError):
    """A call that did not return within its time limit (told apart from a TimeoutError the function raises)."""


class RewardSet:
    """The weighted rewards of a run. Build with `from_specs`; call `score` once per batch."""

    def __init__(self, rewards: Sequence[LoadedReward], *, max_failure_fraction: float = 0.5):
        if not rewards:
            raise ValueError("RewardSet: no rewards given; a run needs at least one")
        if not 0.0 <= max_failure_fraction <= 1.0:
            raise ValueError(f"RewardSet: max_failure_fraction must be in [0, 1], got {max_failure_fraction}")
        _check_unique_names([r.name for r in rewards])
        self.rewards = list(rewards)
        self.max_failure_fraction = max_failure_fraction
        self.failure_totals = {r.name: 0 for r in self.rewards}
        """Failed samples per reward since this set was built."""
        self._worker: _CallWorker | None = None

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[RewardSpec | Mapping[str, Any]],
        base_dir: str | Path | None = None,
        *,
        max_failure_fraction: float = 0.5,
    ) -> RewardSet:
        """Load each spec's function (`posttrain.rewards.loading`); `base_dir`: the recipe's directory."""
        loaded = [_load_spec(i, spec, base_dir) for i, spec in enumerate(specs)]
        return cls(loaded, max_failure_fraction=max_failure_fraction)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def required_columns(self) -> dict[str, list[str]]:
        """Dataset column -> the rewards that read it: every parameter of a reward function without a default other
        than what `score` always passes (`answer` for the verifiers, as TRL-style functions name theirs)."""
        given = {"prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra", "environments"}
        required: dict[str, list[str]] = {}
        for reward in self.rewards:
            try:
                parameters = inspect.signature(reward.fn).parameters.values()
            except (TypeError, ValueError):  # a builtin or C callable: nothing to read
                continue
            for p in parameters:
                plain = p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
                if plain and p.name not in given:
                    required.setdefault(p.name, []).append(reward.name)
        return required

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        columns: Mapping[str, Sequence[Any]] | None = None,
        *,
        extra_kwargs: Mapping[str, Any] | None = None,
    ) -> RewardResult:
        """Score N completions. `columns`: dataset fields, one list of N values each (e.g. `answer`).
        `extra_kwargs`: passed to every function as is (e.g. TRL's `trainer_state`)."""
        n = _check_batch(prompts, completions, completion_ids, columns or {})
        kwargs = {
            "prompts": list(prompts),
            "completions": list(completions),
            "completion_ids": list(completion_ids),
            **(columns or {}),
            **(extra_kwargs or {}),
        }
        per_sample = ("prompts", "completions", "completion_ids", *(columns or {}))
        outcomes = []
        for reward in self.rewards:
            outcome = self._call(reward, kwargs, per_sample, n)
            self._account_failures(reward, outcome, n)
            outcomes.append(outcome)
        # One [K, N] tensor for all rewards keeps the per-batch bookkeeping to a handful of torch ops.
        scores_K_N = torch.tensor([o.scores for o in outcomes], dtype=torch.float32)
        weights_K = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        total_N = weights_K @ scores_K_N.nan_to_num(nan=0.0)
        return RewardResult(
            total=total_N,
            per_reward=dict(zip(self.names, scores_K_N.unbind(0))),
            failures={r.name: o.failed for r, o in zip(self.rewards, outcomes)},
            metrics=_batch_metrics(self.names, scores_K_N, total_N, outcomes),
        )

    def close(self) -> None:
        """Let the worker thread exit. Optional: an idle worker is a daemon blocked on a queue."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def _call(self, reward: LoadedReward, kwargs: dict[str, Any], per_sample: Sequence[str], n: int) -> _CallOutcome:
        start = time.perf_counter()
        value, error = self._invoke(reward, kwargs, reward.timeout_s)
        if error is not None and n > 1 and not isinstance(error, _Timeout):
            return self._call_per_sample(reward, kwargs, per_sample, n, error, start)
        seconds = time.perf_counter() - start
        if error is not None:
            return _whole_call_failure(reward, n, error, seconds)
        return _check_scores(reward, value, n, seconds)

    def _call_per_sample(
        self,
        reward: LoadedReward,
        kwargs: dict[str, Any],
        per_sample: Sequence[str],
        n: int,
        batch_error: BaseException,
        start: float,
    ) -> _CallOutcome:
        """The call on all n samples raised: call once per sample so that only the samples whose own call
        fails score failure_score. The whole pass gets timeout_s, and calling stops once more samples
        have failed than max_failure_fraction allows (the run stops then anyway)."""
        deadline = None if _unlimited(reward.timeout_s) else time.perf_counter() + reward.timeout_s
        scores: list[float] = []
        failed, errors, exception = 0, [], None
        for i in range(n):
            left = None if deadline is None else deadline - time.perf_counter()
            too_many = failed > self.max_failure_fraction * n
            if too_many or (left is not None and left <= 0):
                why = "more than max_failure_fraction had failed" if too_many else "the pass used up timeout_s"
                errors.append(f"samples {i}..{n - 1} not called: {why}")
                scores += [reward.failure_score] * (n - i)
                failed += n - i
                break
            one = {k: kwargs[k][i : i + 1] if k in per_sample else v for k, v in kwargs.items()}
            value, error = self._invoke(reward, one, left)
            outcome = (
                _whole_call_failure(reward, 1, error, 0.0) if error else _check_scores(reward, value, 1, 0.0, first=i)
            )
            scores += outcome.scores
            failed += outcome.failed
            if outcome.failed:
                message = outcome.first_error or ""
                errors.append(message if message.startswith("sample ") else f"sample {i}: {message}")
                exception = exception or outcome.exception
        return _CallOutcome(
            scores,
            failed,
            errors[0] if errors else None,
            exception or batch_error,
            time.perf_counter() - start,
            batch_error=f"{type(batch_error).__name__}: {batch_error}",
        )

    def _invoke(
        self, reward: LoadedReward, kwargs: dict[str, Any], timeout_s: float | None
    ) -> tuple[Any, BaseException | None]:
        if _unlimited(reward.timeout_s):
            return _call_inline(reward.fn, kwargs)
        return self._call_on_worker(reward.fn, kwargs, timeout_s)

    def _call_on_worker(
        self, fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float
    ) -> tuple[Any, BaseException | None]:
        if self._worker is None:
            self._worker = _CallWorker()
        job = self._worker.submit(fn, kwargs, timeout_s)
        if job.wait(timeout_s):
            return job.value, job.error
        # The hung call keeps its thread; later calls must not queue behind it.
        job.call.cancelled.set()
        self._worker.stop()
        self._worker = None
        return None, _timed_out(timeout_s)

    def _account_failures(self, reward: LoadedReward, outcome: _CallOutcome, n: int) -> None:
        retried = f" (the call on all {n} raised {outcome.batch_error}; each sample was then called alone)"
        if outcome.failed == 0:
            if outcome.batch_error is not None:
                logger.warning("reward '%s': every sample scored%s", reward.name, retried, exc_info=outcome.exception)
            return
        self.failure_totals[reward.name] += outcome.failed
        logger.warning(
            "reward '%s': %d of %d samples failed and scored failure_score=%s; first error: %s%s",
            reward.name,
            outcome.failed,
            n,
            reward.failure_score,
            outcome.first_error,
            retried if outcome.batch_error is not None else "",
            exc_info=outcome.exception,
        )
        if outcome.failed / n > self.max_failure_fraction:
            raise RewardFailureError(
                f"reward '{reward.name}': {outcome.failed} of {n} samples failed in one call, more than "
                f"max_failure_fraction={self.max_failure_fraction}; first error: {outcome.first_error}"
            ) from outcome.exception


class _Job:
    """One call handed to the worker. `done` is held until `value` or `error` holds the outcome: a bare
    lock is the cheapest signal to wait on with a timeout (cheaper than threading.Event)."""

    __slots__ = ("call", "done", "error", "fn", "kwargs", "value")

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float):
        self.fn, self.kwargs = fn, kwargs
        self.call = RewardCall(time.monotonic() + timeout_s, threading.Event())
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()

    def run(self) -> None:
        try:
            self.value = _call_as(self.fn, self.kwargs, self.call)
        except BaseException as err:  # a user's sys.exit() must not kill the worker silently
            self.error = err
        finally:
            self.done.release()

    def wait(self, timeout_s: float) -> bool:
        return self.done.acquire(timeout=timeout_s)


class _CallWorker:
    """A daemon thread that runs jobs one at a time. Reused across calls: handing a job to a waiting
    thread costs several times less than starting a thread per call."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # The thread holds only the queue, so dropping the worker queues the stop sentinel.
        thread = threading.Thread(target=_serve, args=(self._jobs,), daemon=True, name="posttrain-reward")
        thread.start()
        self._finalizer = weakref.finalize(self, self._jobs.put, None)

    def submit(self, fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float) -> _Job:
        job = _Job(fn, kwargs, timeout_s)
        self._jobs.put(job)
        return job

    def stop(self) -> None:
        self._finalizer()


def _serve(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        job.run()


def call_within(
    fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float | None
) -> tuple[Any, BaseException | None]:
    """fn(**kwargs) and the exception it raised (a `TimeoutError` after `timeout_s`), for a call made rarely
    (a judge, once per round): on a fresh daemon thread, abandoned if it hangs (see the module docstring);
    inline when `timeout_s` is None."""
    if _unlimited(timeout_s):
        return _call_inline(fn, kwargs)
    worker = _CallWorker()
    job = worker.submit(fn, kwargs, timeout_s)  # type: ignore[arg-type]
    finished = job.wait(timeout_s)  # type: ignore[arg-type]
    if not finished:
        job.call.cancelled.set()
    worker.stop()
    return (job.value, job.error) if finished else (None, _timed_out(timeout_s))  # type: ignore[arg-type]


def _timed_out(timeout_s: float) -> _Timeout:
    return _Timeout(f"no result within {timeout_s:.3g} s (timeout_s); its thread was abandoned")


def _call_inline(fn: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[Any, BaseException | None]:
    try:
        return _call_as(fn, kwargs, RewardCall(None, threading.Event())), None
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # SystemExit too: a reward's sys.exit() must not end the trainer silently
        return None, err


def _unlimited(timeout_s: float | None) -> bool:
    return timeout_s is None or timeout_s == math.inf


def _whole_call_failure(reward: LoadedReward, n: int, error: BaseException, seconds: float) -> _CallOutcome:
    exception = None if isinstance(error, _Timeout) else error
    return _CallOutcome([reward.failure_score] * n, n, describe_failure(error), exception, seconds)


def describe_failure(error: BaseException) -> str:
    """"Kind: message" of a failed call; a call past its time limit reads as a TimeoutError."""
    return f"{'TimeoutError' if isinstance(error, _Timeout) else type(error).__name__}: {error}"


def _check_scores(reward: LoadedReward, value: Any, n: int, seconds: float, *, first: int = 0) -> _CallOutcome:
    """`first`: the batch index of the first sample, for the error message of a per-sample call."""
    values = _as_score_list(value)
    if values is None or len(values) != n:
        got = f"{len(values)} scores" if values is not None else f"a {type(value).__name__}"
        error = ValueError(f"returned {got}, expected a list of {n} scores (one per completion)")
        return _whole_call_failure(reward, n, error, seconds)
    scores: list[float] = []
    failed, first_error = 0, None
    for i, v in enumerate(values):
        score = _as_finite_float(v)
        if score is None:
            failed += 1
            first_error = first_error or f"sample {first + i}: {v!r} is not a finite number"
            score = reward.failure_score
        scores.append(score)
    return _CallOutcome(scores, failed, first_error, None, seconds)


def _as_score_list(value: Any) -> list[Any] | None:
    if isinstance(value, list):
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.dim() == 1 else None
    if value is None or isinstance(value, str | bytes | Mapping) or not hasattr(value, "__len__"):
        return None
    try:
        return list(value)  # tuples, numpy arrays, generators
    except TypeError:
        return None


def _as_finite_float(v: Any) -> float | None:
    """The score as a float (NaN for None, "not applicable"), or None when it is not a finite number."""
    if v is None:
        return math.nan
    if type(v) is float or type(v) is int:  # the common case, without the isinstance checks below
        return float(v) if math.isfinite(v) else None
    if isinstance(v, str | bytes) or not hasattr(v, "__float__"):
        return None
    try:
        score = float(v)  # bool, numpy scalars, one-element tensors
    except (TypeError, ValueError):
        return None
    return score if math.isfinite(score) else None


def _batch_metrics(
    names: list[str], scores_K_N: torch.Tensor, total_N: torch.Tensor, outcomes: list[_CallOutcome]
) -> dict[str, float]:
    rows_R_N = torch.cat([scores_K_N, total_N[None]])  # the K rewards, then the total
    applicable_R_N = ~rows_R_N.isnan()
    count_R = applicable_R_N.sum(dim=1)
    filled_R_N = rows_R_N.nan_to_num(nan=0.0)
    mean_R = filled_R_N.sum(dim=1) / count_R  # 0/0 = NaN when nothing applied
    var_R = ((filled_R_N - mean_R[:, None]).square() * applicable_R_N).sum(dim=1) / count_R
    means, stds, counts = mean_R.tolist(), var_R.sqrt().tolist(), count_R.tolist()
    n = scores_K_N.shape[1]
    metrics: dict[str, float] = {}
    for k, (name, outcome) in enumerate(zip(names, outcomes)):
        metrics[f"rewards/{name}/mean"] = means[k]
        metrics[f"rewards/{name}/std"] = stds[k]
        metrics[f"rewards/{name}/failures"] = float(outcome.failed)
        metrics[f"rewards/{name}/not_applicable"] = float(n - counts[k])
        metrics[f"rewards/{name}/seconds"] = outcome.seconds
    metrics["rewards/total/mean"] = means[-1]
    metrics["rewards/total/std"] = stds[-1]
    return metrics


def _check_batch(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    columns: Mapping[str, Sequence[Any]],
) -> int:
    n = len(completions)
    if n == 0:
        raise ValueError("RewardSet.score: got 0 completions; a batch needs at least one")
    if len(prompts) != n or len(completion_ids) != n:
        raise ValueError(
            f"RewardSet.score: {len(prompts)} prompts, {n} completions and {len(completion_ids)} "
            "completion_ids; they must be equal (repeat each prompt once per completion)"
        )
    for key, values in columns.items():
        if key in _RESERVED_KWARGS:
            raise ValueError(f"RewardSet.score: column '{key}' clashes with a reward argument; rename it")
        if len(values) != n:
            raise ValueError(f"RewardSet.score: column '{key}' has {len(values)} values for {n} completions")
    return n


def _load_spec(index: int, spec: RewardSpec | Mapping[str, Any], base_dir: str | Path | None) -> LoadedReward:
    if not isinstance(spec, RewardSpec):
        spec = _spec_from_mapping(index, spec)
    name = spec.name or default_reward_name(spec.fn)
    try:
        fn = load_reward_fn(spec.fn, spec.args, base_dir)
    except Exception as err:
        if not isinstance(err, RewardLoadError):
            err.add_note(f"while building reward {index} ('{name}', fn '{spec.fn}', args {spec.args})")
        raise
    return LoadedReward(name, fn, spec.weight, spec.timeout_s, spec.failure_score)


def _spec_from_mapping(index: int, spec: Mapping[str, Any]) -> RewardSpec:
    allowed = set(RewardSpec.__dataclass_fields__)
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"reward {index}: unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return RewardSpec(**spec)


def _check_unique_names(names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name == "total":
            raise RewardLoadError("a reward is named 'total', which names the weighted sum; rename it")
        if name in seen:
            raise RewardLoadError(
                f"two rewards are named '{name}'; give each spec a distinct `name` (names key the metrics)"
            )
        seen.add(name)
