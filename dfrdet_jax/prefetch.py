"""Read-ahead of training batches onto the devices, so the accelerator never waits for input.

``DevicePrefetcher`` runs the input iterator and the host-to-device copy in a background
thread, ``depth`` batches ahead of the train step. Each batch comes with the input iterator's
state taken right after it, so a checkpoint written after consuming a batch records exactly the
input position that follows it: resumption stays exact despite the read-ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_END = object()  # the input iterator is exhausted


class _Failure:
    """An exception of the input thread, re-raised in the consumer at its place in the stream."""

    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetcher:
    """Iterates ``(local_batch, placed_batch, input_state)`` up to ``depth`` steps ahead.

    iterator: yields local (per-process) batches, dicts of numpy arrays.
    place: local batch -> the batch the step consumes (e.g. ``sharding.to_global_batch``).
    get_state: iterator -> its JSON-able state (e.g. ``DetectionDataset.get_iterator_state``).

    Use as a context manager (or call ``close``) so the thread stops when training stops. An
    error of the input (a bad record) is raised by ``__next__`` after every batch before it.
    """

    def __init__(
        self,
        iterator: Iterator[dict],
        place: Callable[[dict], Any],
        get_state: Callable[[Iterator[dict]], Any],
        depth: int = 2,
    ):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(iterator, place, get_state), daemon=True
        )
        self._thread.start()

    def _fill(self, iterator, place, get_state) -> None:
        try:
            while not self._stop.is_set():
                try:
                    local = next(iterator)
                except StopIteration:
                    self._put(_END)
                    return
                self._put((local, place(local), get_state(iterator)))
        except BaseException as error:  # pylint: disable=broad-except  # handed to the consumer
            self._put(_Failure(error))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> tuple[dict, Any, Any]:
        item = self._queue.get()
        if item is _END or isinstance(item, _Failure):
            self._queue.put(item)  # the thread has stopped: every later call ends the same way
            if item is _END:
                raise StopIteration
            raise item.error
        return item

    def close(self) -> None:
        """Stops the thread; batches already read ahead are discarded."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
