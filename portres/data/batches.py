"""Batches for training and evaluation, prepared on a background thread.

What a batch contains is a pure function of ``(seed, epoch, batch index)``: the epoch's order is
``np.random.default_rng([seed, epoch]).permutation(N)`` and batch ``b``'s augmentation draws from
``np.random.default_rng([seed, epoch, b])``. Resuming mid-epoch is therefore exact without saving
any RNG state: pass the same seed and epoch and ``start_batch`` = batches already done.

    >>> import numpy as np
    >>> images, labels = np.zeros((10, 1, 4, 4), np.uint8), np.arange(10)
    >>> with batches(images, labels, 4, mean=[0.5], std=[0.25], shuffle=True, seed=0, epoch=0) as it:
    ...     [(x.shape, y.dtype.name) for x, y in it]
    [((4, 1, 4, 4), 'int64'), ((4, 1, 4, 4), 'int64'), ((2, 1, 4, 4), 'int64')]

NumPy releases the GIL in the copies, normalisation and gathers, so the thread overlaps with a
training step.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterator

import numpy as np

from .augment import AUGMENTATIONS
from .dataset import DataError, normalize

_POLL_SECONDS = 0.05  # how often a producer blocked on a full queue checks whether it was stopped
_DONE = object()  # end-of-epoch marker on the queue


class _Failure:
    """An exception raised in the producer, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def num_batches(count: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch for ``count`` examples.

        >>> num_batches(10, 4), num_batches(10, 4, drop_last=True)
        (3, 2)
    """
    return count // batch_size if drop_last else -(-count // batch_size)


def epoch_order(count: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The example indices of one epoch, in order: a permutation from ``default_rng([seed, epoch])``."""
    if not shuffle:
        return np.arange(count)
    return np.random.default_rng([seed, epoch]).permutation(count)


def make_batch(images, labels, order, index: int, batch_size: int, *, mean, std, augment, seed: int,
               epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``index`` of the epoch whose example order is ``order``: normalised float32 images, then
    augmented with ``default_rng([seed, epoch, index])``; and int64 labels."""
    chosen = order[index * batch_size:(index + 1) * batch_size]
    x = normalize(images[chosen], mean, std)
    if augment is not None:
        x = augment(x, np.random.default_rng([seed, epoch, index]))
    return np.ascontiguousarray(x, np.float32), labels[chosen].astype(np.int64, copy=False)


def _produce(jobs: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    # runs on the worker thread; it must not hold a reference to the BatchIterator, or the
    # iterator could never be garbage-collected while the thread waits
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    try:
        for job in jobs:
            if stop.is_set() or not put(job()):
                return
        put(_DONE)
    except BaseException as error:  # noqa: BLE001 (every failure must reach the consumer)
        put(_Failure(error))


def _shutdown(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    if thread is not threading.current_thread():
        thread.join()


class BatchIterator:
    """Iterator over ``(images, labels)`` batches; see :func:`batches`.

    Close it (or use ``with``) to stop the worker thread early; it is also stopped when the
    iterator is garbage-collected. ``len()`` is the number of batches it yields in all.
    """

    def __init__(self, jobs: list[Callable[[], tuple[np.ndarray, np.ndarray]]], prefetch: int) -> None:
        self._length = len(jobs)
        self._finished = False
        if prefetch == 0:  # synchronous: each batch is made when asked for
            self._sync = (job() for job in jobs)
            self._thread = None
            return
        self._sync = None
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_produce, args=(iter(jobs), self._queue, self._stop),
                                        name="portres-batches", daemon=True)
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._thread)
        self._thread.start()

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._finished:
            raise StopIteration
        if self._sync is not None:
            try:
                return next(self._sync)
            except StopIteration:
                self._finished = True
                raise
        item = self._queue.get()
        if item is _DONE or isinstance(item, _Failure):
            self.close()
            if item is _DONE:
                raise StopIteration
            raise item.error
        return item

    def close(self) -> None:
        """Stop the worker thread and wait for it; later ``next()`` calls raise StopIteration."""
        self._finished = True
        if self._thread is not None:
            self._finalizer()  # runs _shutdown once; later calls do nothing

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, mean, std, shuffle: bool = False,
            seed: int = 0, epoch: int = 0, augment: str | Callable | None = None, drop_last: bool = False,
            start_batch: int = 0, prefetch: int = 2) -> BatchIterator:
    """One epoch of ``(images float32 NCHW normalised with mean/std, labels int64)`` batches.

    ``augment``: None, ``"pad_crop_flip"``, ``"flip"`` or a function ``(images, rng) -> images``.
    ``start_batch=k`` yields what the full epoch yields after its first k batches, without making
    them. ``prefetch``: batches made ahead on a background thread (0: none, no thread).
    See the module docstring for the determinism contract and an example.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"batches: images {images.shape} and labels {labels.shape} must be (N, C, H, W) and (N,)")
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    epoch = _check_int("epoch", epoch, 0)
    prefetch = _check_int("prefetch", prefetch, 0)
    start_batch = _check_int("start_batch", start_batch, 0)
    if isinstance(augment, str):
        if augment not in AUGMENTATIONS:
            raise DataError(f"augment={augment!r} is not known; use one of {', '.join(AUGMENTATIONS)} or none")
        augment = AUGMENTATIONS[augment]
    elif augment is not None and not callable(augment):
        raise DataError(f"augment={augment!r} must be a name, a function (images, rng) -> images, or None")
    total = num_batches(images.shape[0], batch_size, drop_last)
    if start_batch > total:
        raise DataError(f"start_batch={start_batch} is past the end of the epoch ({total} batches of {batch_size})")
    order = epoch_order(images.shape[0], shuffle=shuffle, seed=seed, epoch=epoch)
    normalize(images[:1], mean, std)  # fail here, not on the worker thread, when mean/std do not fit

    def job(index: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        return lambda: make_batch(images, labels, order, index, batch_size, mean=mean, std=std, augment=augment,
                                  seed=seed, epoch=epoch)

    return BatchIterator([job(index) for index in range(start_batch, total)], prefetch)
