"""The async micro-batcher: a bounded queue, token-budget batches and the one worker thread that runs them.

Owns: admission (a bounded queue that refuses rather than grows, with a share per caller), fair order
between callers (start-time fair queuing on token cost: the item that runs next is the one with the
smallest virtual start tag, so a caller streaming thousands of items does not make a one-item caller
wait behind all of them), batch formation (same key only, padded cost ``max(cost) · len`` within a
token budget, length bucketing around the item that runs next),
the wait for a batch to fill, overtaking (with ``overtake_tokens``: while a batch runs, a small batch of callers
that have nothing in it and are due in fair order runs in a second thread, and the running batch pauses at its
next ``checkpoint()``: a CPU forward pass of a bulk batch takes seconds, and the one-item caller would otherwise
wait for all of it), cancellation of abandoned work, draining on shutdown, and per-batch statistics handed to a
callback.

Must not: know what a payload, a model, a route or a metric is (it is stdlib only and imports
nothing from ``app``), or run ``process`` on the event loop. ``process`` runs only in the worker
thread; results go back to the awaiting coroutine through ``loop.call_soon_threadsafe``.

Shaped like Infinity's batch handler and TEI's queue: the HTTP layer validates, calls ``submit`` and
awaits; the batcher decides what runs together.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")

log = logging.getLogger(__name__)

#: Bounds on the Retry-After estimate: a client told "0 s" hammers us, one told "3 h" never returns.
_MIN_RETRY_AFTER_S = 1.0
_MAX_RETRY_AFTER_S = 60.0
#: Weight of the newest batch in the throughput estimate (an exponential moving average).
_RATE_ALPHA = 0.2
#: Overtaking batches may hold one running batch paused for at most this many times ``overtake_tokens`` padded tokens.
_OVERTAKE_SHARE = 4


class QueueFull(Exception):
    """The queue cannot take the whole request now; ``retry_after_s`` estimates when it could."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatcherClosed(Exception):
    """The batcher is stopping or stopped: new work is refused and, without drain, waiting work fails."""


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What one batch cost, for metrics; ``queue_depth`` is the items still waiting when it finished."""

    size: int
    padded_tokens: int
    real_tokens: int
    seconds: float
    queue_depth: int
    ok: bool = True


@dataclass(eq=False, slots=True)
class _Call:
    """One ``submit``: its items are delivered together, so one future serves them all."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Any]]
    results: list[Any]
    remaining: int
    # Set (under the lock) once the future was resolved, failed or abandoned: later results are dropped.
    done: bool = False
    items: list[_Item] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Item:
    payload: Any
    cost: int
    key: Hashable
    seq: int  # arrival order across all keys: the oldest item has the smallest seq
    enqueued: float  # time.monotonic() at submit
    call: _Call
    index: int  # position in the call's payloads, hence in its results
    caller: Hashable = None  # who submitted it (an opaque identity: the batcher only compares them)
    tag: float = 0.0  # virtual start time (fair queuing): items run in tag order, the oldest first on ties


@dataclass(eq=False, slots=True)
class _Admission:
    """A ``submit(wait=True)`` standing in line for room in the queue; granted room is reserved for it."""

    n: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    granted: bool = False
    caller: Hashable = None


def _set_result(future: asyncio.Future[Any], results: Any) -> None:
    # The awaiting task may have been cancelled meanwhile; a cancelled future takes no result.
    if not future.done():
        future.set_result(results)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _lower_other_threads(keep: set[int | None], nice: int) -> None:
    """Run every thread of this process but those in ``keep`` (and the threads they start later) at ``nice``.

    Why: on a CPU with as many cores as the model's compute threads, a forward pass is a series of
    parallel regions that wait for their slowest thread; whenever request handling (the event loop,
    tokenizing threads) takes a core, the whole pass stalls. At a lower priority that work fills the
    gaps instead. The worker keeps its priority, and so do the compute threads it starts itself.
    Raising nice needs no privilege, and it is never lowered back. Per-thread priorities are a
    Linux feature (elsewhere PRIO_PROCESS with a thread id would renice the whole process): a no-op there.
    """
    if not sys.platform.startswith("linux"):
        log.info("feeder_nice is a Linux feature; leaving thread priorities alone on %s", sys.platform)
        return
    for entry in os.listdir("/proc/self/task"):
        tid = int(entry)
        if tid in keep:
            continue
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
        except (ProcessLookupError, PermissionError) as err:  # the thread ended meanwhile, or a sandbox forbids it
            log.debug("could not lower thread %d's priority: %s", tid, err)


def _post(call: _Call | _Admission, fn: Callable[[asyncio.Future[Any], Any], None], arg: Any) -> None:
    """Hand a result to the call's own loop; only that loop may touch its future."""
    try:
        call.loop.call_soon_threadsafe(fn, call.future, arg)
    except RuntimeError:
        # The submitting loop has closed, so no coroutine is left to receive this.
        log.debug("dropping a result for a closed event loop")


class MicroBatcher(Generic[P, R]):
    """Collects items from many coroutines into token-budget batches and runs ``process`` on them in one thread.

    ``process(payloads)`` must return one result per payload, in order. It runs in the worker thread
    only, one batch at a time, so a model that is not thread-safe needs no lock of its own — unless
    ``overtake_tokens`` > 0: then a second thread may run ``process`` on a small batch while the worker's
    batch is paused inside ``process`` at a ``checkpoint()`` (or, if ``process`` never calls it, beside it),
    so ``process`` must then be safe to call from two threads at once.
    """

    def __init__(
        self,
        process: Callable[[Sequence[P]], Sequence[R]],
        *,
        max_batch_tokens: int,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        name: str = "default",
        on_batch: Callable[[BatchStats], None] | None = None,
        feeder_nice: int = 0,
        max_padding: float = 1.0,
        max_queue_per_caller: int | None = None,
        overtake_tokens: int = 0,
    ) -> None:
        limits = {"max_batch_tokens": max_batch_tokens, "max_batch_size": max_batch_size, "max_queue": max_queue}
        for field_name, value in limits.items():
            if value < 1:
                raise ValueError(f"{field_name} must be >= 1, got {value}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if not 0 <= max_padding <= 1:
            raise ValueError(f"max_padding must be within 0..1, got {max_padding}")
        if not 0 <= feeder_nice <= 19:
            raise ValueError(f"feeder_nice must be within 0..19, got {feeder_nice}")
        if overtake_tokens < 0:
            raise ValueError(f"overtake_tokens must be >= 0, got {overtake_tokens}")
        if max_queue_per_caller is not None and not 1 <= max_queue_per_caller <= max_queue:
            raise ValueError(f"max_queue_per_caller must be within 1..max_queue={max_queue}, got {max_queue_per_caller}")
        #: The most items one caller may hold queued (and reserved); beyond it that caller alone is refused (or
        #: waits, with ``wait``), so one caller cannot fill the queue for everyone.
        self.max_queue_per_caller = max_queue if max_queue_per_caller is None else max_queue_per_caller
        self._process = process
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.name = name
        self._on_batch = on_batch
        self.feeder_nice = feeder_nice
        self.max_padding = max_padding
        #: The padded-token budget of an overtaking batch (0: no overtaking). See ``checkpoint``.
        self.overtake_tokens = overtake_tokens

        self._cond = threading.Condition()
        # Waiting items by seq; dicts keep insertion order, so the first entry is the oldest.
        self._waiting: dict[int, _Item] = {}
        self._by_key: dict[Hashable, dict[int, _Item]] = {}
        self._seq = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._items_per_s: float | None = None  # throughput while busy, for Retry-After
        # Callers that wait for room (``submit(wait=True)``), first come first served, and the room
        # granted to them but not yet filled. While anyone is in line, callers that do not wait are
        # refused: otherwise a stream of small calls takes every freed slot and a large one starves.
        self._line: collections.deque[_Admission] = collections.deque()
        self._reserved = 0
        # Fair queuing: items (waiting + reserved) held per caller, each caller's last virtual finish time, and the
        # virtual time (the start tag of the item that ran last).
        self._held: dict[Hashable, int] = {}
        self._finish: dict[Hashable, float] = {}
        self._vtime = 0.0
        # Overtaking: the callers of the worker's running batch (None while it is idle), whether an overtaking
        # batch runs now, its thread, and the seconds the running batch spent paused (kept out of its stats).
        self._running_callers: frozenset[Hashable] | None = None
        self._running_vtime = 0.0  # the virtual time when the running batch started: the overtaking horizon's base
        self._overtaken = 0  # padded tokens that overtook the running batch (at most _OVERTAKE_SHARE × overtake_tokens)
        self._overtaking = False
        self._overtaker: threading.Thread | None = None
        self._paused_s = 0.0

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (a daemon, so a forgotten ``stop`` cannot keep the process alive)."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError(f"batcher {self.name!r} was already started")
            if self._closed:
                raise BatcherClosed(f"batcher {self.name!r} was stopped and cannot be restarted")
            self._thread = threading.Thread(target=self._worker, name=f"batcher-{self.name}", daemon=True)
            self._thread.start()
            keep = {self._thread.native_id}
            if self.overtake_tokens:
                self._overtaker = threading.Thread(target=self._overtake_worker, name=f"batcher-{self.name}-overtake", daemon=True)
                self._overtaker.start()
                keep.add(self._overtaker.native_id)
        if self.feeder_nice:
            _lower_other_threads(keep, self.feeder_nice)

    async def stop(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Refuse new work; with ``drain`` finish what is queued, else fail it with ``BatcherClosed``.

        Waits up to ``timeout_s`` for the worker to end. If it does not (a batch hangs), whatever is
        still waiting fails with ``BatcherClosed`` and ``TimeoutError`` is raised. Calling it again
        is harmless.
        """
        with self._cond:
            self._closed = True
            if not drain or self._thread is None:
                self._fail_waiting(BatcherClosed(f"batcher {self.name!r} stopped before this work ran"))
            self._cond.notify_all()
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + timeout_s
        await asyncio.to_thread(thread.join, timeout_s)
        if thread.is_alive():
            with self._cond:
                self._fail_waiting(BatcherClosed(f"batcher {self.name!r} did not drain within {timeout_s} s"))
                self._cond.notify_all()
        if self._overtaker is not None:  # one deadline for both threads
            await asyncio.to_thread(self._overtaker.join, max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise TimeoutError(f"batcher {self.name!r}: worker still busy after stop timeout_s={timeout_s}")

    def shed_waiting(self, reason: str) -> int:
        """Refuse new work and fail what has not started (queued items, calls in line) with ``BatcherClosed``;
        the batch running now finishes. For the end of a shutdown grace: what could not start in time gets a
        retryable answer instead of being cut off. Returns how many items were failed."""
        with self._cond:
            self._closed = True
            shed = len(self._waiting)
            self._fail_waiting(BatcherClosed(reason))
            self._cond.notify_all()
        return shed

    def check_room(self, n: int, caller: Hashable = None) -> None:
        """Raise ``QueueFull`` now if ``n`` items of ``caller`` would not fit, so a caller refuses before costly work
        (tokenizing); ``submit`` checks again, since the queue may fill in between."""
        with self._cond:
            self._check_room_locked(n, caller)

    def _check_room_locked(self, n: int, caller: Hashable = None) -> None:
        depth = len(self._waiting) + self._reserved
        in_line = sum(a.n for a in self._line)
        # Room that callers in line wait for: theirs to take first. A caller in line for its own share only (it holds
        # max_queue_per_caller already) waits for its own items, and keeps nobody else out.
        blocking = sum(a.n for a in self._line if a.caller != caller and not self._over_share(a.caller, a.n))
        own_line = any(a.caller == caller for a in self._line)
        if own_line or depth + blocking + n > self.max_queue:
            retry = self._retry_after(depth + in_line + n - self.max_queue)
            ahead = f" ({len(self._line)} calls of {in_line} items waiting for room first)" if self._line else ""
            raise QueueFull(
                f"batcher {self.name!r}: {depth} items waiting + {n} new exceed max_queue={self.max_queue}{ahead}; "
                f"retry in {retry:.0f} s",
                retry,
            )
        held = self._held.get(caller, 0)
        if self._over_share(caller, n):
            retry = self._retry_after(held + n - self.max_queue_per_caller)
            raise QueueFull(
                f"batcher {self.name!r}: this caller holds {held} queued items + {n} new exceed its share "
                f"max_queue_per_caller={self.max_queue_per_caller}; retry in {retry:.0f} s",
                retry,
            )

    def _over_share(self, caller: Hashable, n: int) -> bool:
        return self._held.get(caller, 0) + n > self.max_queue_per_caller

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not those already running)."""
        with self._cond:
            return len(self._waiting)

    # ---- the event-loop side ---------------------------------------------------------------------

    async def submit(self, payloads: Sequence[P], costs: Sequence[int], key: Hashable = None, *, wait: bool = False,
                     caller: Hashable = None) -> list[R]:
        """Queue ``payloads`` (all or none) and return their results in order.

        ``costs[i]`` is payload i's token count; ``key`` groups payloads that may share a batch; ``caller``
        names who submits (e.g. a client token's digest): callers share the worker fairly by token cost, and
        each may hold at most ``max_queue_per_caller`` items.
        Raises ``QueueFull`` when the queue cannot take all of them now — unless ``wait``: then the
        call stands in line (first come, first served) until room is freed for all of its items.
        Raises ``ValueError`` when the call alone exceeds ``max_queue`` (no wait would help: split
        it), ``BatcherClosed`` once stopping. Cancelling the awaiting task withdraws the items still
        waiting (or the call's place in line).
        """
        n = len(payloads)
        if len(costs) != n:
            raise ValueError(f"costs: got {len(costs)} costs for {n} payloads")
        for i, cost in enumerate(costs):
            if cost < 0:
                raise ValueError(f"costs[{i}]: a token count must be >= 0, got {cost}")
        if n > self.max_queue_per_caller:
            raise ValueError(f"payloads: {n} items in one call exceed max_queue={self.max_queue}"
                             + (f" (max_queue_per_caller={self.max_queue_per_caller})" if self.max_queue_per_caller < self.max_queue else "")
                             + "; split the request")
        if n == 0:
            return []
        loop = asyncio.get_running_loop()
        call = _Call(loop=loop, future=loop.create_future(), results=[None] * n, remaining=n)
        admission: _Admission | None = None
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"batcher {self.name!r} is stopping; no new work is accepted")
            if self._thread is None:
                raise RuntimeError(f"batcher {self.name!r}: call start() before submit()")
            if wait:
                admission = _Admission(n, loop, loop.create_future(), caller=caller)
                self._line.append(admission)
                self._admit_locked()
            else:
                self._check_room_locked(n, caller)
                self._enqueue_locked(call, payloads, costs, key, caller)
        if admission is not None:
            try:
                await admission.future
            except asyncio.CancelledError:
                with self._cond:
                    self._leave_line_locked(admission)
                raise
            with self._cond:
                self._reserved -= n
                self._release(caller, n)
                if self._closed:
                    self._admit_locked()
                    raise BatcherClosed(f"batcher {self.name!r} is stopping; no new work is accepted")
                self._enqueue_locked(call, payloads, costs, key, caller)
        try:
            return await call.future
        except asyncio.CancelledError:
            self._abandon(call)
            raise

    def _enqueue_locked(self, call: _Call, payloads: Sequence[P], costs: Sequence[int], key: Hashable, caller: Hashable = None) -> None:
        now = time.monotonic()
        by_key = self._by_key.setdefault(key, {})
        # Start-time fair queuing: a caller's items start where its previous ones finished in virtual time, or
        # now (the virtual time) if it has been idle; each advances its caller's clock by its token cost.
        start = max(self._vtime, self._finish.get(caller, 0.0))
        for i, (payload, cost) in enumerate(zip(payloads, costs)):
            item = _Item(payload, int(cost), key, next(self._seq), now, call, i, caller, start)
            start += max(int(cost), 1)
            call.items.append(item)
            self._waiting[item.seq] = item
            by_key[item.seq] = item
        self._finish[caller] = start
        self._held[caller] = self._held.get(caller, 0) + len(payloads)
        self._cond.notify_all()  # the worker, and the overtaking thread if there is one

    def _release(self, caller: Hashable, n: int) -> None:
        """``n`` items of ``caller`` left the queue (ran, withdrawn, or their reservation was used or given back)."""
        held = self._held.get(caller, 0) - n
        if held > 0:
            self._held[caller] = held
            return
        self._held.pop(caller, None)
        if self._finish.get(caller, 0.0) <= self._vtime:
            self._finish.pop(caller, None)  # an idle caller restarts at the virtual time anyway: keep no entry per caller

    def _admit_locked(self) -> None:
        """Grant room to the callers in line, first come first served, as far as the queue has it; a caller over its
        own share waits for its own items to run and does not hold back the callers behind it."""
        over: set[Hashable] = set()
        for admission in list(self._line):
            if admission.caller in over:
                continue  # a caller's calls keep their order
            if self._over_share(admission.caller, admission.n):
                over.add(admission.caller)
                continue
            if len(self._waiting) + self._reserved + admission.n > self.max_queue:
                break
            self._line.remove(admission)
            admission.granted = True
            self._reserved += admission.n
            self._held[admission.caller] = self._held.get(admission.caller, 0) + admission.n
            _post(admission, _set_result, None)

    def _leave_line_locked(self, admission: _Admission) -> None:
        """A caller in line was cancelled: give back its place, or the room already granted to it."""
        if admission.granted:
            self._reserved -= admission.n
            self._release(admission.caller, admission.n)
        elif admission in self._line:
            self._line.remove(admission)
        self._admit_locked()

    def _abandon(self, call: _Call) -> None:
        """The client went away: withdraw its waiting items; running ones finish and are dropped."""
        with self._cond:
            call.done = True
            self._withdraw(call)

    def _retry_after(self, excess: int) -> float:
        """Seconds until ``excess`` more items could fit, from recent throughput."""
        rate = self._items_per_s
        seconds = excess / rate if rate else _MIN_RETRY_AFTER_S
        return float(min(_MAX_RETRY_AFTER_S, max(_MIN_RETRY_AFTER_S, math.ceil(seconds))))

    # ---- queue bookkeeping (caller holds the lock) -----------------------------------------------

    def _remove(self, item: _Item) -> None:
        self._release(item.caller, 1)
        del self._waiting[item.seq]
        same_key = self._by_key[item.key]
        del same_key[item.seq]
        if not same_key:
            del self._by_key[item.key]  # keys come and go; do not keep an entry per key ever seen

    def _withdraw(self, call: _Call) -> None:
        for item in call.items:
            if item.seq in self._waiting:
                self._remove(item)
        self._admit_locked()

    def _fail_waiting(self, exc: BaseException) -> None:
        for item in list(self._waiting.values()):
            if not item.call.done:
                item.call.done = True
                _post(item.call, _set_exception, exc)
        self._waiting.clear()
        self._by_key.clear()
        self._held.clear()
        for admission in self._line:
            _post(admission, _set_exception, exc)
        self._line.clear()

    def _form(self, anchor: _Item, among: Callable[[_Item], bool] | None = None, budget: int | None = None) -> tuple[list[_Item], bool]:
        """The batch around ``anchor``: same key, nearest in cost, within size, token budget and padding.

        Sorting by cost and growing a window around the anchor keeps short and long texts apart, so
        padding stays small; ``max_padding`` caps the share of the padded tokens that are padding
        (on a CPU a padded token costs as much as a real one, and batching gains less than that).
        Returns the batch and whether it is full (no further item could join by size or budget). ``among`` limits
        the candidates (the anchor is one), ``budget`` replaces ``max_batch_tokens`` (both: for an overtaking batch).
        """
        budget = self.max_batch_tokens if budget is None else budget
        # Ties in cost go to the earliest in fair order (with one caller, the oldest): fillers are who is due next.
        items = sorted((it for it in self._by_key[anchor.key].values() if among is None or it is anchor or among(it)),
                       key=lambda it: (it.cost, it.tag, it.seq))
        at = next(i for i, it in enumerate(items) if it is anchor)
        lo = hi = at
        real = anchor.cost

        def fits(width: int, size: int, real_tokens: int) -> bool:
            padded = width * size
            return padded <= budget and padded - real_tokens <= self.max_padding * padded

        while hi - lo + 1 < self.max_batch_size:
            grown = hi - lo + 2
            # Sorted by cost, so items[hi] is the batch's max cost: a left neighbour keeps it, a right one raises it.
            left = items[lo - 1] if lo > 0 and fits(items[hi].cost, grown, real + items[lo - 1].cost) else None
            right = items[hi + 1] if hi + 1 < len(items) and fits(items[hi + 1].cost, grown, real + items[hi + 1].cost) else None
            if left is None and right is None:
                break
            if right is None or (left is not None and anchor.cost - left.cost <= right.cost - anchor.cost):
                lo -= 1
                assert left is not None  # right is None here only when left is not: both None broke out above
                real += left.cost
            else:
                hi += 1
                real += right.cost
        size = hi - lo + 1
        full = size >= self.max_batch_size or items[hi].cost * (size + 1) > budget
        return items[lo : hi + 1], full

    def _next_batch(self) -> list[_Item] | None:
        """Block until a batch should run and take it from the queue; None when the worker should end.

        The batch of the item that runs next (the smallest fair-queuing tag; with one caller, the oldest) runs
        once full or once that item has waited ``max_wait_s``. While it is still filling, a full batch of
        another key may run: idling the device helps nobody, and that item's deadline still bounds its wait.
        """
        while True:
            if not self._waiting:
                if self._closed:
                    return None
                self._cond.wait()
                continue
            # The item that runs next: the smallest virtual start tag (with one caller, simply the oldest).
            first = min(self._waiting.values(), key=lambda it: (it.tag, it.seq))
            batch, full = self._form(first)
            now = time.monotonic()
            deadline = first.enqueued + self.max_wait_s
            if not (full or self._closed or now >= deadline):
                other = self._full_batch_of_other_key(first.key)
                if other is None:
                    self._cond.wait(deadline - now)
                    continue
                batch = other
            self._vtime = max(self._vtime, min(item.tag for item in batch))
            for item in batch:
                self._remove(item)
            self._admit_locked()
            return batch

    def _full_batch_of_other_key(self, skip: Hashable) -> list[_Item] | None:
        for key, same_key in self._by_key.items():
            if key == skip:
                continue
            batch, full = self._form(next(iter(same_key.values())))
            if full:
                return batch
        return None

    def _overtake_batch(self) -> list[_Item] | None:
        """A batch that may run beside the worker's (caller holds the lock): items of callers with nothing in the
        running batch whose fair-queuing tags are due (within ``overtake_tokens`` of the virtual time at which the running
        batch started), at most
        ``overtake_tokens`` padded tokens, around the one due first. None if there is none.

        The tag bound keeps it fair: an idle caller's item starts at the virtual time, so a one-item caller is due;
        a caller that queued many items has tags far ahead and waits its turn in the worker's order."""
        running = self._running_callers
        if running is None or self._overtaking or self._overtaken >= _OVERTAKE_SHARE * self.overtake_tokens:
            return None  # many callers, each due, must not hold the running batch paused without end
        # From the running batch's start, not the virtual time now: overtaking batches advance the virtual time, and a
        # horizon that moved with them would let one caller's chain of small items overtake again and again.
        horizon = self._running_vtime + self.overtake_tokens

        def due(item: _Item) -> bool:
            return item.caller not in running and item.tag <= horizon and item.cost <= self.overtake_tokens

        candidates = [item for item in self._waiting.values() if due(item)]
        if not candidates:
            return None
        anchor = min(candidates, key=lambda it: (it.tag, it.seq))
        batch, _ = self._form(anchor, among=due, budget=self.overtake_tokens)
        return batch

    def _overtake_worker(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed and not self._waiting:
                        return
                    batch = self._overtake_batch()
                    if batch is not None:
                        break
                    self._cond.wait()
                self._vtime = max(self._vtime, min(item.tag for item in batch))
                for item in batch:
                    self._remove(item)
                self._admit_locked()
                self._overtaking = True
                self._overtaken += max(item.cost for item in batch) * len(batch)
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._overtaking = False
                    self._cond.notify_all()

    def checkpoint(self) -> None:
        """A safe point inside ``process`` (e.g. between a model's layers): in the worker thread, wait here while an
        overtaking batch runs. Elsewhere, and without overtaking, it returns at once (a cheap check)."""
        if not self._overtaking or threading.current_thread() is not self._thread:
            return
        began = time.perf_counter()
        with self._cond:
            while self._overtaking:
                self._cond.wait()
        self._paused_s += time.perf_counter() - began

    # ---- the worker thread -----------------------------------------------------------------------

    def _worker(self) -> None:
        try:
            while True:
                with self._cond:
                    batch = self._next_batch()
                    if batch is not None:
                        self._running_callers = frozenset(item.caller for item in batch)
                        self._running_vtime = self._vtime
                        self._overtaken = 0
                    self._cond.notify_all()  # an overtaking thread waits for a running batch (or for the end)
                if batch is None:
                    return
                try:
                    self._run(batch)
                finally:
                    with self._cond:
                        self._running_callers = None
        finally:
            # Normally a no-op (stop drained the queue); after an unexpected death it unblocks every waiter.
            with self._cond:
                self._closed = True
                self._fail_waiting(BatcherClosed(f"batcher {self.name!r}: worker thread ended"))
                self._cond.notify_all()

    def _run(self, batch: list[_Item]) -> None:
        """Run one batch and deliver its results; an error fails this batch's callers only."""
        error: Exception | None = None
        results: list[R] = []
        start = time.perf_counter()
        main = threading.current_thread() is self._thread
        if main:
            self._paused_s = 0.0
        try:
            results = list(self._process([item.payload for item in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"batcher {self.name!r}: process returned {len(results)} results for {len(batch)} payloads")
        except Exception as exc:
            error = exc
            log.error("batcher %r: a batch of %d items failed", self.name, len(batch), exc_info=exc)
        seconds = time.perf_counter() - start - (self._paused_s if main else 0.0)
        with self._cond:
            if error is None:
                for item, result in zip(batch, results):
                    call = item.call
                    if call.done:
                        continue  # cancelled, or failed in another batch: the result has no taker
                    call.results[item.index] = result
                    call.remaining -= 1
                    if call.remaining == 0:
                        call.done = True
                        _post(call, _set_result, call.results)
            else:
                for item in batch:
                    call = item.call
                    if not call.done:
                        call.done = True
                        _post(call, _set_exception, error)
                        self._withdraw(call)  # its other items would only be computed and thrown away
            if main:  # the worker's batches only: an overtaking batch is small and runs beside it (not a rate of its own)
                rate = len(batch) / max(seconds, 1e-6)
                self._items_per_s = rate if self._items_per_s is None else (1 - _RATE_ALPHA) * self._items_per_s + _RATE_ALPHA * rate
            depth = len(self._waiting)
        if self._on_batch is not None:
            stats = BatchStats(
                size=len(batch),
                padded_tokens=max(item.cost for item in batch) * len(batch),
                real_tokens=sum(item.cost for item in batch),
                seconds=seconds,
                queue_depth=depth,
                ok=error is None,
            )
            try:
                self._on_batch(stats)
            except Exception:
                # A metrics hook must not take inference down with it; the log keeps the error visible.
                log.exception("batcher %r: on_batch callback failed", self.name)
