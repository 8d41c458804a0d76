"""Evaluations that finish on a worker thread while training goes on (``background=True``).

An :class:`~lightning_rsm.callbacks.evaluation.Evaluation` (the features of one step) is handed
to :class:`Background`, which runs the same
:meth:`~lightning_rsm.callbacks.evaluation.Evaluator.run` as the synchronous path on its
:class:`Worker` and hands back the :class:`~lightning_rsm.callbacks.evaluation.Outcome`:

========================  ==============================================================
training thread           the probe forward (it needs the weights of its step), the
                          features copied off (:func:`copy_off`), and everything that talks
                          to Lightning or a logger (:mod:`lightning_rsm.callbacks.reporting`)
worker thread             the semantic RSMs, scores and images of one evaluation at a time
(:class:`Worker`)         (scipy's LAP and torch release the GIL); under DDP its collectives
                          run in a gloo group of its own, never in training's
========================  ==============================================================

The contract, as ``RSMMonitor`` keeps it: the same numbers as ``background=False``, bit for
bit, and the same guarantees (training is unchanged, resume equals a straight run, DDP equals
one process). At most one evaluation is pending: a due one first waits for the last, so memory
stays bounded, results come in order, and the RSMs of the previous evaluation (for
``rsa_to_previous``) and the colour ranges are read by the worker only after the training thread
has stored them. A finished evaluation is reported after the next training batch or epoch end,
at the step of its features (the same step as synchronously); so ``trainer.callback_metrics``
(and ``ModelCheckpoint``, ``EarlyStopping``) see it late, usually one evaluation interval.
Two evaluations are waited for in their own hook: the first of a fit when a callback monitors an
``rsm/`` key (so that key exists at its first check) and that of the last epoch (``max_epochs``,
``max_steps``, ``should_stop`` already set); a fit stopped otherwise waits at its end. A
checkpoint saved while an evaluation runs on features of the checkpoint's own step stores where
it was taken, not the features; at resume the probe is run again on the restored weights
(checked against a :func:`fingerprint`; a mismatch is a warning) and the evaluation computed
then. Training waits in short slices (:meth:`Background.wait`), so Ctrl-C gets through at once,
with a progress line while it waits. An exception in training (Ctrl-C included) cancels the
running evaluation at its next block of pairs (the ``should_stop`` of
:func:`~lightning_rsm.functional.semantic_rsm`) and joins the worker, bounded by
``JOIN_TIMEOUT_S``; the monitor names the evaluation that was not finished. A failure on the
worker is a warning. On CUDA the ``"auction"`` and ``"greedy"`` matchers run on the device in a
stream of the worker's own (:func:`worker_stream`); the scipy matchers work on CPU copies (whose
float32 matmuls may round differently from the synchronous path's on the GPU). Nothing in this
module imports Lightning.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from lightning_rsm.callbacks.evaluation import Evaluation, Outcome

T = TypeVar("T")
WAIT_SLICE_S = 0.1  # training waits for the worker in slices this long: signals get through
JOIN_TIMEOUT_S = 30.0  # at most this long for a cancelled evaluation to reach a block's end


@dataclass
class Pending:
    """A submitted evaluation: where its features were taken, their :func:`fingerprint`, and
    the future of its :class:`Outcome`."""

    epoch: int
    step: int
    log_step: int
    fingerprint: list[float]
    future: Future


def fingerprint(features: Mapping[str, Tensor]) -> list[float]:
    """One float64 sum per layer: the same features give the same list, bit for bit.

    Example:
        >>> fingerprint({"conv": torch.ones(2, 3, 4)})
        [24.0]
    """
    return [float(tensor.double().sum()) for tensor in features.values()]


def copy_off(evaluation: Evaluation, keep_on_cuda: bool) -> Evaluation:
    """The evaluation as the worker may use it while training goes on.

    CPU features are used as they are (freshly made, nothing in training writes to them). CUDA
    features are copied to the CPU (the scipy matchers run there), unless ``keep_on_cuda`` (the
    torch matchers, ``"auction"`` and ``"greedy"``, run on the device): then they stay and
    ``ready`` gets an event recorded on the training thread's stream after their last write.

    Example:
        >>> e = Evaluation(0, 3, {"conv": torch.ones(2, 4, 1)}, None, 0.1)
        >>> copy_off(e, keep_on_cuda=False).features["conv"].device
        device(type='cpu')
    """
    on_cuda = any(tensor.is_cuda for tensor in evaluation.features.values())
    if not on_cuda:
        return evaluation
    if not keep_on_cuda:
        features = {layer: tensor.cpu() for layer, tensor in evaluation.features.items()}
        return replace(evaluation, features=features)
    ready = torch.cuda.Event()
    ready.record()
    return replace(evaluation, ready=ready)


@contextmanager
def worker_stream(evaluation: Evaluation) -> Iterator[None]:
    """Run the block on a CUDA stream of its own that first waits for ``evaluation.ready``, so
    the worker's kernels never queue behind (or between) training's; a no-op on the CPU."""
    if evaluation.ready is None:
        yield
        return
    device = next(iter(evaluation.features.values())).device
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        stream.wait_event(evaluation.ready)
        for tensor in evaluation.features.values():
            tensor.record_stream(stream)  # the allocator keeps them until this stream is done
        yield
        stream.synchronize()


class Worker:
    """One daemon thread that runs submitted functions one at a time, in submission order.

    Args:
        threads: torch intra-op threads of the worker thread (its own OpenMP setting).
        name: the thread's name.

    Example:
        >>> worker = Worker(threads=1)
        >>> worker.submit(lambda: 6 * 7).result()
        42
        >>> worker.stop()
        True
    """

    def __init__(self, threads: int, name: str = "lightning_rsm-monitor") -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(threads,), name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[[], T]) -> Future:
        """Queue ``function``; its result or exception comes back in the returned future.

        Raises:
            RuntimeError: If the worker was stopped.
        """
        if self._stopped.is_set():
            raise RuntimeError("Expected a running worker, but it was stopped.")
        future: Future = Future()
        self._queue.put((future, function))
        return future

    def stop(self, timeout: float | None = None) -> bool:
        """Cancel what has not started and let the running function (if any) end; wait up to
        ``timeout`` seconds (None: as long as it takes) for the thread to end. Whether it has
        ended. Safe to call twice."""
        self._stopped.set()
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        while (item := self._queue.get()) is not None:
            future, function = item
            if self._stopped.is_set():
                future.cancel()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = function()
            except BaseException as error:  # handed to the training thread, never lost
                future.set_exception(error)
            else:
                future.set_result(result)


class Background:
    """The callback's side of background evaluation: a :class:`Worker`, a gloo group of its own
    under DDP, and at most one :class:`Pending` evaluation.

    Under DDP every rank must create it at the same point (e.g. in ``setup``): the group is
    created collectively, and every rank's worker then runs the same evaluations in the same
    order, so their collectives pair up.

    Args:
        distributed: whether the Trainer runs several processes in a process group.
        threads: torch intra-op threads of the worker thread.
        keep_on_cuda: leave CUDA features on the device (see :func:`copy_off`).
    """

    def __init__(self, *, distributed: bool, threads: int, keep_on_cuda: bool) -> None:
        self.group = dist.new_group(backend="gloo") if distributed else None
        self.keep_on_cuda = keep_on_cuda
        self.pending: Pending | None = None
        self._cancel = threading.Event()  # asked by the running evaluation between blocks
        self._worker = Worker(threads)

    @property
    def distributed(self) -> bool | dist.ProcessGroup:
        """What the worker passes as ``distributed``: its group, or False."""
        return self.group if self.group is not None else False

    def submit(
        self, evaluation: Evaluation, compute: Callable[[Evaluation, Any, Callable], Outcome]
    ) -> None:
        """Start ``compute(evaluation, self.distributed, should_stop)`` on the worker (without
        gradients, on a stream of its own for CUDA features); ``should_stop`` turns True when
        :meth:`close` cancels it.

        Raises:
            RuntimeError: If an evaluation is still pending (take it with :meth:`finished`).
        """
        if self.pending is not None:
            raise RuntimeError(
                f"Expected no pending evaluation, but the one of step {self.pending.step} is."
            )
        prints = fingerprint(evaluation.features)
        evaluation = copy_off(evaluation, self.keep_on_cuda)

        def run() -> Outcome:
            with torch.no_grad(), worker_stream(evaluation):
                return compute(evaluation, self.distributed, self._cancel.is_set)

        future = self._worker.submit(run)
        self.pending = Pending(
            evaluation.epoch, evaluation.step, evaluation.log_step, prints, future
        )

    @property
    def busy(self) -> bool:
        """Whether an evaluation is pending and still running."""
        return self.pending is not None and not self.pending.future.done()

    def wait(self, progress: bool = False) -> float:
        """Return once the pending evaluation (if any) has finished, waiting in slices of
        ``WAIT_SLICE_S`` so that signals (Ctrl-C) get through; with ``progress``, a tqdm line
        "RSMMonitor: waiting for the evaluation of epoch E (step S)" while it waits (closed
        afterwards). The seconds waited.

        Example:
            >>> background = Background(distributed=False, threads=1, keep_on_cuda=False)
            >>> background.wait()
            0.0
            >>> background.close() is None
            True
        """
        pending = self.pending
        if pending is None or pending.future.done():
            return 0.0
        start = time.perf_counter()
        label = (
            f"RSMMonitor: waiting for the evaluation of epoch {pending.epoch} (step {pending.step})"
        )
        bar = tqdm(
            desc=label,
            bar_format="{desc}, {elapsed}",
            leave=False,
            mininterval=1.0,
            disable=not progress,
        )
        with bar:
            while not wait_for([pending.future], timeout=WAIT_SLICE_S).done:
                bar.update(0)  # redrawn at most once a second
        return time.perf_counter() - start

    def finished(self, wait: bool = False) -> Outcome | None:
        """The pending evaluation's outcome once it has finished (with ``wait``, once it does:
        :meth:`wait`), and it is no longer pending; None if there is none or it is still
        running. An exception on the worker comes back as a failed outcome of rank 0."""
        if wait:
            self.wait()
        pending = self.pending
        if pending is None or not pending.future.done():
            return None
        self.pending = None
        try:
            return pending.future.result()
        except Exception as error:
            failure = (0, f"{type(error).__name__}: {error}")
            return Outcome(pending.epoch, pending.step, pending.log_step, failure=failure)

    def close(self) -> Pending | None:
        """Cancel the running evaluation at its next block of pairs, stop the worker and wait
        for its thread to end (at most ``JOIN_TIMEOUT_S``); the pending evaluation is dropped
        and returned (None if there was none). The worker's group is not destroyed here but
        goes with the default group: destroying it at teardown, when the other rank may already
        have left, hung a rank of a 2-process fit on torch 2.1."""
        dropped, self.pending = self.pending, None
        self._cancel.set()
        self._worker.stop(timeout=JOIN_TIMEOUT_S)
        self.group = None
        return dropped
