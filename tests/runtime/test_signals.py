"""StopRequest: the first SIGINT/SIGTERM only sets a flag, a second stops at once, handlers are restored."""

import os
import signal
import threading

import pytest

from posttrain.runtime.signals import StopRequest, TrainingInterrupted


@pytest.fixture
def sentinel_handlers():
    """Known handlers for SIGINT and SIGTERM during the test, the originals back afterwards."""
    calls = []

    def sentinel(signum, frame):
        calls.append(signum)

    originals = {s: signal.signal(s, sentinel) for s in (signal.SIGINT, signal.SIGTERM)}
    yield sentinel, calls
    for s, handler in originals.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_sets_the_flag_and_the_handlers_come_back(signum, sentinel_handlers):
    sentinel, calls = sentinel_handlers
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signum)
        assert stop.requested and stop.signal_number == signum  # and the process is still here
    assert signal.getsignal(signal.SIGINT) is sentinel and signal.getsignal(signal.SIGTERM) is sentinel
    os.kill(os.getpid(), signum)
    assert calls == [signum]  # after the block, the previous handler gets the signal


def test_a_second_sigint_interrupts_at_once(sentinel_handlers):
    sentinel, _ = sentinel_handlers
    with pytest.raises(KeyboardInterrupt), StopRequest():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is sentinel


def test_a_second_sigterm_exits_with_143(sentinel_handlers):
    sentinel, _ = sentinel_handlers
    with pytest.raises(SystemExit) as exited, StopRequest():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    assert exited.value.code == 143  # 128 + 15
    assert signal.getsignal(signal.SIGTERM) is sentinel


def test_the_second_signal_decides_how_to_stop(sentinel_handlers):
    with pytest.raises(KeyboardInterrupt), StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    assert stop.signal_number == signal.SIGTERM  # the request that was being honoured


def test_outside_the_main_thread_nothing_is_installed(sentinel_handlers):
    sentinel, _ = sentinel_handlers
    seen = []

    def enter() -> None:
        with StopRequest() as stop:
            seen.append((signal.getsignal(signal.SIGTERM), stop.requested))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [(sentinel, False)]


def test_interrupted_carries_the_step_checkpoint_and_exit_code(tmp_path):
    with StopRequest() as stop:
        with pytest.raises(RuntimeError, match="no signal was received"):
            stop.interrupted(3, tmp_path)
        os.kill(os.getpid(), signal.SIGTERM)
    error = stop.interrupted(7, tmp_path / "step-00000007")
    assert isinstance(error, TrainingInterrupted)
    assert str(error) == f"stopped by SIGTERM after step 7; checkpoint written: {tmp_path / 'step-00000007'}"
    assert (error.step, error.exit_code) == (7, 143)
    assert TrainingInterrupted(signal.SIGINT, 1, tmp_path).exit_code == 130
