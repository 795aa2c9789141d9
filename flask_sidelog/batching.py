"""The write modes that share commits: ``group`` and ``buffered``.

Both hand batches to :meth:`Writer.insert <flask_sidelog.writer.Writer.insert>`
(one transaction each) and report failures through
:meth:`Writer.failed <flask_sidelog.writer.Writer.failed>`.

- :class:`GroupCommitter`: the caller waits until its entries are committed.
  Callers that arrive while a commit is running queue up; when it ends, the
  first of them commits everything queued in one multi-row INSERT (a leader and
  followers, no thread of its own). Alone, a caller commits its own entries at
  once, as ``sync`` does.
- :class:`BufferedQueue`: the caller does not wait; a thread of the writer
  commits batches.

Threads and locks do not survive ``fork()`` (gunicorn ``--preload``): the child
gets a lock some other thread may hold, and no thread. Every committer resets
itself in the child, and buffered entries queued before the fork are left to
the parent that owns them. On SQLite the fork waits until no thread uses the
log, whose file locks the child would inherit held (:meth:`Writer.before_fork
<flask_sidelog.writer.Writer.before_fork>`).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import contextvars
import os
import sys
import threading
import time
import typing as t
import weakref

from .engine import refused_for_content

if t.TYPE_CHECKING:
    from .writer import Writer

Entries = list[dict[str, t.Any]]

#: A buffered queue holds at most this many batches before callers wait.
QUEUE_BATCHES = 10
#: A buffered writer thread with nothing to do for this long ends; the next
#: entry starts a new one, so idle apps keep no thread.
IDLE_SECONDS = 5.0
#: Longest a group commit waits for the audited requests of this process
#: that are still running, so that their entries share its commit. Under
#: load it saves a commit per request that joins; alone, a request never waits.
GATHER_SECONDS = 0.001

#: The running-request token of this context's audited request, if a
#: committer counts it: such a caller must not wait for itself. A weak
#: reference, so that a context variable left set in a pooled thread keeps
#: nothing alive.
_running_here: contextvars.ContextVar[weakref.ref[Running] | None] = (
    contextvars.ContextVar("sidelog_running_here", default=None)
)


class Running:
    """Held by an audited request (on its context state) while it runs. A
    committer counts the tokens still alive, so a request whose teardown
    never ran (a teardown before it raised) stops counting when its app
    context is dropped."""

    __slots__ = ("__weakref__",)


def _own_token() -> Running | None:
    ref = _running_here.get()
    return None if ref is None else ref()


class _Waiter:
    """One caller's entries in a group commit, and how its wait ended."""

    __slots__ = ("entries", "lead", "error", "done", "gone", "_wake")

    def __init__(self, entries: Entries) -> None:
        self.entries = entries
        #: Woken to commit the next batch rather than because it was committed.
        self.lead = False
        self.error: Exception | None = None
        #: Its batch ended: ``error`` says how.
        self.done = False
        #: Its caller stopped waiting (interrupted): the leader reports it.
        self.gone = False
        self._wake = threading.Lock()
        self._wake.acquire()

    def wait(self) -> None:
        self._wake.acquire()

    def wake(self) -> None:
        self._wake.release()


class GroupCommitter:
    """Commits concurrent callers' entries together; each caller returns once
    its own entries are committed (or failed).

    :param writer: the writer whose ``insert`` and ``failed`` are used.
    :param batch_size: most entries in one transaction.
    """

    def __init__(self, writer: Writer, batch_size: int) -> None:
        self.writer = writer
        self.batch_size = batch_size
        self.after_fork()

    def after_fork(self) -> None:
        """Start empty: waiters queued at the fork are threads of the parent."""
        self._mutex = threading.Lock()
        self._joined = threading.Condition(self._mutex)
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._leading = False
        #: Audited requests running in this process, whose entries will come.
        self._running: weakref.WeakSet[Running] = weakref.WeakSet()

    def request_started(self) -> Running:
        """An audited request started: a commit may wait a little for it.

        :return: the token the request must hold while it runs.
        """
        token = Running()
        with self._mutex:
            self._running.add(token)
        _running_here.set(weakref.ref(token))
        return token

    def request_ended(self) -> None:
        """The audited request of this context is done (a no-op if its
        entries already said so)."""
        if _own_token() is not None:
            with self._mutex:
                self._stop_counting()
                self._joined.notify()

    def _stop_counting(self) -> None:
        token = _own_token()
        _running_here.set(None)
        if token is not None:
            self._running.discard(token)

    def write(self, entries: Entries, ends_request: bool = False) -> bool:
        """Commit ``entries``, with whatever other callers wait, and report.

        Success and failure are reported in the caller's own thread, so an
        error raised by the failure path reaches the caller.

        :param ends_request: these are the last entries of an audited request;
            it stops counting as running as they join the queue, not before,
            so that a waiting commit takes them.
        """
        me = _Waiter(entries)
        with self._mutex:
            if ends_request:
                self._stop_counting()
            self._waiting.append(me)
            me.lead = not self._leading
            self._leading = True
            self._joined.notify()
        if not me.lead:
            try:
                me.wait()
            except BaseException:
                # Interrupted (Ctrl-C, a job timeout raised by a signal
                # handler): left in the queue, it would be handed the lead
                # and never take it, and every later caller would wait.
                self._leave(me)
                raise
        if me.lead:
            self._commit_next_batch()
        return self._report(me)

    def _report(self, waiter: _Waiter) -> bool:
        if waiter.error is not None:
            self.writer.failed(waiter.entries, waiter.error)
            return False
        self.writer.written(waiter.entries)
        return True

    def _leave(self, me: _Waiter) -> None:
        """Take ``me``, whose caller stops waiting, out of the group commit.
        Still queued, its entries go the error path now; in a batch being
        committed, the leader reports them when it ends."""
        with self._mutex:
            queued = me in self._waiting
            if queued:
                self._waiting.remove(me)
                if me.lead:  # handed the lead: hand it on
                    me.lead = False
                    successor = self._waiting[0] if self._waiting else None
                    self._leading = successor is not None
                    if successor is not None:
                        successor.lead = True
                        successor.wake()
            elif not me.done:
                me.gone = True
                return
        if queued:
            me.error = RuntimeError("the thread waiting for this entry was interrupted")
        with contextlib.suppress(Exception):  # the interruption is what it raises
            self._report(me)

    def _commit_next_batch(self) -> None:
        # Until the insert returns, the batch counts as failed: if this thread
        # is interrupted (KeyboardInterrupt, also while it gathers), the others
        # must not report success, and the next in line must take over.
        error: Exception | None = RuntimeError(
            "the thread committing this batch was interrupted"
        )
        batch: list[_Waiter] = []
        fail_queue = False
        try:
            with self._mutex:
                # The leader is always first in line: it arrived to an empty
                # queue, or was first in line when the previous leader handed over.
                batch.append(self._waiting.popleft())
                size = len(batch[0].entries)
                self._gather(size)
                while (
                    self._waiting
                    and size + len(self._waiting[0].entries) <= self.batch_size
                ):
                    batch.append(self._waiting.popleft())
                    size += len(batch[-1].entries)
            self.writer.insert([entry for w in batch for entry in w.entries])
            error = None
        except Exception as e:
            error = e
            # The database is down, locked or slower than the timeout: the
            # callers queued meanwhile fail with this batch, or each batch
            # after it would wait out the timeout again, and so would they.
            fail_queue = not refused_for_content(e)
        finally:
            with self._mutex:
                if fail_queue:
                    batch += self._waiting
                    self._waiting.clear()
                successor = self._waiting[0] if self._waiting else None
                self._leading = successor is not None
                for waiter in batch:
                    waiter.lead = False
                    waiter.error = error
                    waiter.done = True
                if successor is not None:
                    successor.lead = True
            for waiter in batch[1:]:
                if waiter.gone:
                    with contextlib.suppress(Exception):  # not this caller's
                        self._report(waiter)
                else:
                    waiter.wake()
            if successor is not None:
                successor.wake()

    def _gather(self, size: int) -> None:
        """Wait (holding no lock) up to :data:`GATHER_SECONDS` for the other
        running audited requests to queue their entries; ``size`` entries are
        in the batch already."""
        own = 1 if _own_token() in self._running else 0
        deadline = time.monotonic() + GATHER_SECONDS
        while len(self._running) > own and size + self._queued() < self.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._joined.wait(remaining)

    def _queued(self) -> int:
        return sum(len(w.entries) for w in self._waiting)

    def flush(self) -> None:
        """Nothing to do: every caller waits for its own commit."""


class BufferedQueue:
    """Queues entries and commits them in a thread, in batches of up to
    ``batch_size`` or after ``interval`` seconds, whichever comes first.

    At most ``QUEUE_BATCHES * batch_size`` entries wait; a caller that finds
    the queue full waits up to ``interval`` for room, then writes inline.
    Nothing is dropped.
    """

    def __init__(self, writer: Writer, batch_size: int, interval: float) -> None:
        self.writer = writer
        self.batch_size = batch_size
        self.interval = interval
        self.capacity = QUEUE_BATCHES * batch_size
        self.after_fork()

    def after_fork(self) -> None:
        """Start empty: entries queued at the fork are the parent's to write."""
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[dict[str, t.Any]] = collections.deque()
        self._thread: threading.Thread | None = None
        #: Entries ever queued, and entries the thread has taken care of
        #: (committed or failed), in queue order: a flush waits for the
        #: second to reach what the first was when it started.
        self._queued = 0
        self._done = 0
        self._urgent = 0

    def write(self, entries: Entries, ends_request: bool = False) -> bool:
        """Queue ``entries``; write them inline if the queue stays full."""
        deadline: float | None = None
        with self._cond:
            while self._queue and len(self._queue) + len(entries) > self.capacity:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.interval
                    self._cond.notify_all()
                elif now >= deadline:
                    break
                self._cond.wait(deadline - now)
            else:
                if self._start_thread():
                    idle = not self._queue
                    self._queue.extend(entries)
                    self._queued += len(entries)
                    # An empty queue: the thread may be in its idle wait,
                    # and must start this batch's interval now.
                    if idle or len(self._queue) >= self.batch_size:
                        self._cond.notify_all()
                    return True
        return self.writer.write_now(entries)

    def _start_thread(self) -> bool:
        if self._thread is not None and self._thread.is_alive():
            return True
        thread = threading.Thread(
            target=self._run, name="flask-sidelog buffered writer", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # at interpreter shutdown: write inline
            return False
        self._thread = thread
        _flush_at_multiprocessing_exit()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._cond.wait_for(
                    lambda: bool(self._queue), IDLE_SECONDS
                ):
                    self._thread = None
                    return
                deadline = time.monotonic() + self.interval
                while len(self._queue) < self.batch_size and not self._urgent:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                size = min(self.batch_size, len(self._queue))
                batch = [self._queue.popleft() for _ in range(size)]
                self._cond.notify_all()  # room for callers waiting on a full queue
            try:
                self.writer.insert(batch)
            except Exception as error:
                if not refused_for_content(error):
                    # Down, locked, slower than the timeout: each batch queued
                    # would wait out the timeout in turn (at exit, past any
                    # grace period), so they go the error path with this one,
                    # as in a group commit.
                    with self._cond:
                        batch += self._queue
                        size = len(batch)
                        self._queue.clear()
                        self._cond.notify_all()
                self._report(batch, error)
            else:
                self._report(batch, None)
            with self._cond:
                self._done += size
                self._cond.notify_all()

    def _report(self, batch: Entries, error: Exception | None) -> None:
        try:
            if error is None:
                self.writer.written(batch)
            else:
                self.writer.failed(batch, error)
        except Exception:  # a raising receiver must not end the thread
            self.writer.app.logger.exception(
                "flask-sidelog could not report a buffered batch."
            )

    def request_started(self) -> None:
        """Nothing to do: the caller does not wait for a commit."""
        return None

    def request_ended(self) -> None:
        """Nothing to do: the caller does not wait for a commit."""

    def flush(self) -> None:
        """Return once every entry queued before the call is committed or
        reported failed."""
        with self._cond:
            target = self._queued
            self._urgent += 1
            self._cond.notify_all()
            try:
                while self._done < target:
                    if (
                        self._thread is None
                        or not self._thread.is_alive()
                        # Called back by it (a signal receiver): it would
                        # wait for itself.
                        or self._thread is threading.current_thread()
                    ):
                        break
                    self._cond.wait(self.interval)
                else:
                    return
                # No thread to wait for (interpreter shutdown): write inline.
                batch = list(self._queue)
                self._queue.clear()
            finally:
                self._urgent -= 1
        if batch:
            try:
                self.writer.write_now(batch)
            finally:
                # Only now: a flush of another thread must not return first.
                with self._cond:
                    self._done += len(batch)
                    self._cond.notify_all()


Batcher = GroupCommitter | BufferedQueue

_live: weakref.WeakSet[Writer] = weakref.WeakSet()


def make_batcher(
    writer: Writer, mode: str, batch_size: int, interval: float
) -> Batcher | None:
    """The committer for ``mode`` (None for ``sync``); ``writer`` is reset
    in a forked child and flushed at interpreter exit from now on."""
    _live.add(writer)
    if mode == "group":
        return GroupCommitter(writer, batch_size)
    if mode == "buffered":
        return BufferedQueue(writer, batch_size, interval)
    return None


def _hold_before_fork() -> None:
    for writer in list(_live):
        writer.before_fork()


def _release_in_parent() -> None:
    for writer in list(_live):
        writer.after_fork_in_parent()


def _reset_in_child() -> None:
    for writer in list(_live):
        writer.after_fork()


#: The process that registered :func:`_close_all` with multiprocessing.
_registered_in: int | None = None


def _flush_at_multiprocessing_exit() -> None:
    """Have a child process of :mod:`multiprocessing` flush at its end too:
    a forked one ends with ``os._exit()``, which runs no ``atexit`` function,
    once its finalizers have run."""
    global _registered_in
    if _registered_in == os.getpid():
        return
    _registered_in = os.getpid()
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is not None and multiprocessing.parent_process() is not None:
        import multiprocessing.util

        multiprocessing.util.Finalize(None, _close_all, exitpriority=10)


def _close_all() -> None:
    for writer in list(_live):
        try:
            writer.flush()
        except Exception:  # at exit there is no caller to raise to
            writer.app.logger.exception("flask-sidelog could not flush at exit.")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_hold_before_fork,
        after_in_parent=_release_in_parent,
        after_in_child=_reset_in_child,
    )
atexit.register(_close_all)
