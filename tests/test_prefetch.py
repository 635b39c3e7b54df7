"""DevicePrefetcher: order, the input state of each batch, errors in place, clean stop."""

import numpy as np
import pytest

from dfrdet_jax.prefetch import DevicePrefetcher


class CountingInput:
    """Batches {'x': [i]} for i = 0..n-1; state = index of the next batch; fails at ``fail_at``."""

    def __init__(self, n, fail_at=None):
        self.position, self.n, self.fail_at = 0, n, fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.position == self.fail_at:
            raise ValueError(f"bad record {self.position}")
        if self.position == self.n:
            raise StopIteration
        self.position += 1
        return {"x": np.array([self.position - 1])}


def _state(iterator):
    return {"next": iterator.position}


def test_batches_arrive_in_order_placed_with_the_state_after_each():
    with DevicePrefetcher(CountingInput(5), lambda b: b["x"] * 10, _state, depth=2) as batches:
        got = list(batches)
    assert [int(local["x"][0]) for local, _, _ in got] == [0, 1, 2, 3, 4]
    assert [int(placed[0]) for _, placed, _ in got] == [0, 10, 20, 30, 40]
    # A checkpoint after consuming batch i resumes at i + 1, not at the read-ahead position.
    assert [state["next"] for *_, state in got] == [1, 2, 3, 4, 5]
    with pytest.raises(StopIteration):
        next(batches)


def test_input_error_is_raised_after_the_batches_before_it():
    batches = DevicePrefetcher(CountingInput(10, fail_at=3), lambda b: b, _state, depth=4)
    assert [int(next(batches)[0]["x"][0]) for _ in range(3)] == [0, 1, 2]
    for _ in range(2):  # and stays raised
        with pytest.raises(ValueError, match="bad record 3"):
            next(batches)
    batches.close()


def test_close_stops_the_thread_with_a_full_queue_and_reads_no_further():
    source = CountingInput(10**6)
    batches = DevicePrefetcher(source, lambda b: b, _state, depth=2)
    next(batches)
    batches.close()
    assert not batches._thread.is_alive()  # pylint: disable=protected-access
    # One consumed, two queued, at most one more in flight when the stop came.
    assert source.position <= 4


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        DevicePrefetcher(CountingInput(1), lambda b: b, _state, depth=0)
