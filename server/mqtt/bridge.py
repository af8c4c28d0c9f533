"""The MQTT bridge: decode at the edge, group-commit in one writer, then publish.

* The consumer turns every inbound message into a typed message or drops it, logged and
  counted by reason; nothing it receives can stop it.
* One writer task drains whatever is queued (up to ``max_batch``), handles it in ONE
  database transaction with a SAVEPOINT per message, commits, and only then hands the
  replies to the publisher. A failing message is rolled back alone, kept in
  ``dead_letters`` and (for a scan) answered with an INTERNAL_ERROR deny.
* A single writer and a single publisher keep each gate's order.
* Several service processes may share one PostgreSQL database (MQTT shared subscriptions),
  and QoS 1 redelivery can hand the same event to two of them at once. The loser of that
  race hits a unique index (``processed_events``, a spent nonce, a payment key) once the
  winner commits: its SAVEPOINT is rolled back and the event handled again, which now finds
  the winner's stored answer and sends that, never a contradicting one. A deadlock between
  two such batches leaves the victim's event unanswered (no effect, no dead letter): the
  gateway publishes it again and gets the stored answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session

from parking_protocol.clock import Clock
from parking_protocol.messages import (
    CommandReply,
    DecodeFailure,
    GatewayStatus,
    ProtocolError,
    ScanEvent,
    decode,
)
from parking_protocol.topics import TopicKind, TopicRef, all_gates_filter, parse_topic, shared
from parking_protocol.transport import InboundMessage, Transport, TransportUnavailable
from server.gateways.sequence import SeqTracker
from server.gateways.service import record_reply, record_status
from server.sessions.fastpath import FastPath
from server.sessions.flows import (
    FlowConfig,
    Reply,
    command_not_executed,
    handle_scan,
    internal_error_reply,
    unavailable_reply,
)
from server.sessions.service import record_dead_letter

__all__ = ["BatchListener", "Bridge", "BridgeStats", "Inbound", "ScanHandler"]

log = logging.getLogger(__name__)

ScanHandler = Callable[..., Reply]
"""``handler(db, event, ref, *, now, config) -> Reply`` (``handle_scan`` in production)."""

_EXPECTED: dict[TopicKind, type[ScanEvent | GatewayStatus | CommandReply]] = {
    TopicKind.EVENTS: ScanEvent,
    TopicKind.STATUS: GatewayStatus,
    TopicKind.REPLIES: CommandReply,
}


@dataclass
class BridgeStats:
    """Counters for logs, tests and (later) metrics."""

    received: int = 0
    bad_topics: int = 0
    decode_failures: Counter[DecodeFailure] = field(default_factory=Counter)
    events: int = 0
    replays: int = 0
    statuses: int = 0
    replies: int = 0
    dead_letters: int = 0
    conflicts: int = 0
    """Events that lost a race with another process and were handled again (or left)."""
    seq_gaps: int = 0
    """Times a gateway's event arrived with earlier ones of its sequence missing."""
    undone: int = 0
    """Entries and exits undone because the gate let their "open" expire unexecuted."""
    misaddressed: int = 0
    """Statuses and replies naming another gate than the topic they came on (ignored)."""
    fast: int = 0
    """Events decided by the batched fast path (the rest went through the ORM flow)."""
    fast_fallbacks: int = 0
    """Fast-path runs that failed (a race, a deadlock) and were handled by the ORM flow."""
    batches: int = 0
    largest_batch: int = 0
    failed_batches: int = 0
    published: int = 0
    publish_failures: int = 0


@dataclass(frozen=True, slots=True)
class Inbound:
    ref: TopicRef
    topic: str
    payload: bytes
    message: ScanEvent | GatewayStatus | CommandReply


_CONFLICT_RETRIES = 2
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


def _sqlstate(exc: OperationalError) -> str | None:
    state = getattr(exc.orig, "sqlstate", None)
    return state if isinstance(state, str) else None


def _unreachable(exc: OperationalError) -> bool:
    """A failure of the database connection, not of this message's statements."""
    state = _sqlstate(exc)
    return bool(exc.connection_invalidated) or state is None or state.startswith(("08", "57P"))


class _Scope:
    """One batch's transaction: a Core connection (all the fast path needs), and an ORM
    session over it, made only when a message goes through the ORM flow. The session joins
    the connection's transaction (``rollback_only``): its SAVEPOINTs are the messages', the
    batch commits with the connection. A Session per batch cost a batch of one ~0.3 ms."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._db: Session | None = None

    @property
    def db(self) -> Session:
        if self._db is None:
            self._db = Session(
                bind=self.conn, expire_on_commit=False, join_transaction_mode="rollback_only"
            )
        return self._db

    def expire(self) -> None:
        if self._db is not None:
            self._db.expire_all()

    def __enter__(self) -> _Scope:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._db is not None:
            self._db.close()


class _FirstRunFailed(Exception):
    """The fast run a transaction began with failed, without a SAVEPOINT to roll back to."""

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length


BatchListener = Callable[[Sequence[Inbound], Sequence[Reply]], None]
"""Called on the event loop after each batch committed, with its messages and replies."""


class Bridge:
    """Consumes gate events, statuses and replies; publishes commands and acks."""

    def __init__(
        self,
        transport: Transport,
        engine: Engine,
        clock: Clock,
        config: FlowConfig,
        *,
        shared_group: str | None = None,
        max_batch: int = 200,
        queue_size: int = 10_000,
        handler: ScanHandler = handle_scan,
        on_batch: BatchListener | None = None,
        fast_path: FastPath | None = None,
    ) -> None:
        self.transport = transport
        self.fast_path = fast_path
        self.on_batch = on_batch
        self.engine = engine
        self.clock = clock
        self.config = config
        self.shared_group = shared_group
        self.max_batch = max_batch
        self.handler = handler
        self.stats = BridgeStats()
        self.sequences = SeqTracker()
        self._queue: asyncio.Queue[Inbound] = asyncio.Queue(queue_size)
        self._outbox: asyncio.Queue[tuple[list[Reply], list[asyncio.Future[object]], int]] = (
            asyncio.Queue()
        )
        # The one thread batches are handled in: the default executor handed each batch to
        # whichever of its workers was free, and one thread kept hot took a saturated
        # service from 1,781 to 2,946 events/s (docs/scaling.md). Through the loop's
        # run_in_executor, so the simulation's virtual-time loop still runs batches inline.
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------
    def subscriptions(self) -> list[str]:
        events = all_gates_filter(TopicKind.EVENTS)
        replies = all_gates_filter(TopicKind.REPLIES)
        if self.shared_group:
            events, replies = shared(self.shared_group, events), shared(self.shared_group, replies)
        # Statuses are retained, and shared subscriptions get no retained messages.
        return [events, replies, all_gates_filter(TopicKind.STATUS)]

    async def start(self) -> None:
        for topic_filter in self.subscriptions():
            await self.transport.subscribe(topic_filter, qos=1)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="bridge-writer")
        self._tasks = [
            asyncio.create_task(self._consume(), name="bridge:consume"),
            asyncio.create_task(self._write(), name="bridge:write"),
            asyncio.create_task(self._publish(), name="bridge:publish"),
        ]

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop taking messages, finish what is queued (bounded), then stop."""
        if not self._tasks:
            return
        consume, *rest = self._tasks
        consume.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consume
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_idle(), drain_timeout)
        for task in rest:
            task.cancel()
        for task in rest:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown)  # after the batch it is in, if any

    async def wait_idle(self) -> None:
        """Until everything accepted so far is committed and published."""
        await self._idle.wait()

    # -- the edge: topic + payload -> typed message ---------------------------------------------
    def accept(self, message: InboundMessage) -> Inbound | None:
        """Parse and decode one message; a bad one is logged, counted and dropped."""
        self.stats.received += 1
        ref = parse_topic(message.topic)
        expected = _EXPECTED.get(ref.kind) if ref is not None else None
        if ref is None or expected is None:
            self.stats.bad_topics += 1
            log.warning("dropped message on unexpected topic %r", message.topic[:200])
            return None
        try:
            decoded = decode(message.payload, expected)
        except ProtocolError as exc:
            self.stats.decode_failures[exc.failure] += 1
            log.warning("dropped %s payload on %s: %s", ref.kind, message.topic, exc)
            return None
        if isinstance(decoded, ScanEvent):
            self._track_sequence(ref, decoded)
        return Inbound(ref=ref, topic=message.topic, payload=message.payload, message=decoded)

    def _track_sequence(self, ref: TopicRef, event: ScanEvent) -> None:
        """Notice events of a gateway that have not arrived (its outbox replays them)."""
        assert ref.gate_id is not None
        change = self.sequences.observe(ref.lot_id, ref.gate_id, boot=event.boot, seq=event.seq)
        if change.opened:
            self.stats.seq_gaps += 1
            log.warning(
                "gateway %s/%s sent seq %d with %d earlier event(s) not received (%d..%d);"
                " waiting for its outbox to replay them",
                ref.lot_id,
                ref.gate_id,
                event.seq,
                len(change.opened),
                change.opened[0],
                change.opened[-1],
            )
        if change.abandoned:
            log.warning(
                "gateway %s/%s restarted its sequence at boot %d with %d event(s) of the"
                " previous boot never received: %s",
                ref.lot_id,
                ref.gate_id,
                event.boot,
                len(change.abandoned),
                list(change.abandoned[:20]),
            )

    async def _consume(self) -> None:
        signatures = self.config.signatures
        async for message in self.transport.messages():
            inbound = self.accept(message)
            if inbound is not None:
                if signatures is not None and isinstance(inbound.message, ScanEvent):
                    signatures.submit(inbound.message.code, self.config.keys)
                self._pending += 1
                self._idle.clear()
                await self._queue.put(inbound)

    # -- the single writer ------------------------------------------------------------------------
    async def _write(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                replies = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.process_batch, batch
                )
            except Exception:
                self.stats.failed_batches += 1
                log.exception("batch of %d not committed; scans denied as unavailable", len(batch))
                now = self.clock.now()
                replies = [
                    unavailable_reply(item.message, item.ref, now=now, config=self.config)
                    for item in batch
                    if isinstance(item.message, ScanEvent)
                ]
            # The commands go out first (and are on the wire after one turn of the loop);
            # the listeners (the panel's feed, metrics, caches) run after, off their path.
            sent = [
                self.transport.publish_nowait(r.topic, r.payload, qos=1, expiry=r.expiry)
                for r in replies
            ]
            await self._outbox.put((replies, sent, len(batch)))
            await asyncio.sleep(0)
            if self.on_batch is not None:
                try:
                    self.on_batch(batch, replies)
                except Exception:
                    log.exception("batch listener failed")

    def process_batch(self, batch: list[Inbound]) -> list[Reply]:
        """One transaction for the batch (runs in a thread), in batch order: runs of online
        scans through the fast path (one SAVEPOINT per run, but for a run the transaction
        begins with), everything else, and whatever the fast path leaves, one message per
        SAVEPOINT through the ORM flow."""
        try:
            replies = self._transaction(batch, bare_start=True)
        except _FirstRunFailed as failed:
            # Nothing of it was written: the transaction was rolled back whole.
            replies = self._transaction(batch, bare_start=False, orm_until=failed.length)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        return replies

    def _transaction(
        self, batch: list[Inbound], *, bare_start: bool, orm_until: int = 0
    ) -> list[Reply]:
        """``bare_start``: a fast run at the start goes without a SAVEPOINT (two statements
        fewer for a batch of one; if it fails, :class:`_FirstRunFailed` rolls back the whole
        transaction and the batch is done again with that run through the ORM flow:
        ``orm_until``)."""
        replies: list[Reply] = []
        with self.engine.connect() as conn, conn.begin(), _Scope(conn) as scope:
            i = 0
            while i < len(batch):
                run = self._fast_run(batch, i) if i >= orm_until else []
                if run:
                    bare = bare_start and i == 0
                    decided = self._process_fast(scope, run, savepoint=not bare)
                    if decided is None and bare:
                        raise _FirstRunFailed(len(run))
                    if decided is None:  # the run failed as a whole: one by one instead
                        replies.extend(
                            r for item in run if (r := self._process_one(scope.db, item))
                        )
                        i += len(run)
                        continue
                    replies.extend(decided)
                    i += len(decided)
                    if len(decided) == len(run):
                        continue
                reply = self._process_one(scope.db, batch[i])
                if reply is not None:
                    replies.append(reply)
                i += 1
        return replies

    def _fast_run(self, batch: list[Inbound], start: int) -> list[Inbound]:
        """The online scans from ``start`` on that the fast path may take, in a row (none
        when another handler than the ORM flow's ``handle_scan`` decides scans)."""
        if self.fast_path is None or self.handler is not handle_scan:
            return []
        end = start
        while end < len(batch):
            message = batch[end].message
            if not isinstance(message, ScanEvent) or not self.fast_path.handles(message):
                break
            end += 1
        return batch[start:end]

    def _process_fast(
        self, scope: _Scope, run: list[Inbound], *, savepoint: bool = True
    ) -> list[Reply] | None:
        """Decide a prefix of ``run`` in one SAVEPOINT (or none: the caller rolls back the
        transaction if it fails); None if the run failed as a whole (nothing of it written,
        once rolled back): a race with another process, a deadlock, a bug."""
        assert self.fast_path is not None
        now = self.clock.now()
        items = [(item.message, item.ref) for item in run if isinstance(item.message, ScanEvent)]
        try:
            with scope.conn.begin_nested() if savepoint else contextlib.nullcontext():
                outcome = self.fast_path.decide(scope.conn, items, now)
        except OperationalError as exc:
            if _unreachable(exc):
                raise
            self.stats.fast_fallbacks += 1
            log.info("fast path run of %d left to the ORM flow: %s", len(run), exc)
            return None
        except Exception:
            self.stats.fast_fallbacks += 1
            log.warning(
                "fast path run of %d failed; the ORM flow decides it", len(run), exc_info=True
            )
            return None
        if outcome.replies:
            scope.expire()  # rows the session loaded earlier may have changed under it
        self.stats.fast += len(outcome.replies)
        self.stats.events += len(outcome.replies)
        self.stats.replays += outcome.replayed
        return outcome.replies

    def _process_one(self, db: Session, item: Inbound) -> Reply | None:
        """Handle one message in its own SAVEPOINT; a lost race is handled once more."""
        races = 0
        while True:
            now = self.clock.now()
            try:
                with db.begin_nested():
                    return self._handle(db, item, now)
            except IntegrityError as exc:
                # Another process committed the same event (or spent the same code) first.
                if races == _CONFLICT_RETRIES:
                    return self._dead_letter(db, item, exc, now)
                races += 1
                self.stats.conflicts += 1
                log.info("%s lost a race with another writer; handled again", item.topic)
            except OperationalError as exc:
                if _unreachable(exc):
                    # The database went away (a restart, a lost connection, SQLite busy):
                    # nothing is wrong with the message. The whole batch fails and its
                    # scans are denied as unavailable; the gateways send them again.
                    raise
                if _sqlstate(exc) not in _TRANSIENT_SQLSTATES:
                    return self._dead_letter(db, item, exc, now)
                self.stats.conflicts += 1
                log.warning("%s left unanswered after %s; the gateway retries", item.topic, exc)
                return None
            except Exception as exc:
                return self._dead_letter(db, item, exc, now)

    def _handle(self, db: Session, item: Inbound, now: datetime) -> Reply | None:
        message = item.message
        if isinstance(message, ScanEvent):
            reply = self.handler(db, message, item.ref, now=now, config=self.config)
            self.stats.events += 1
            self.stats.replays += reply.replayed
            return reply
        if (message.lot_id, message.gate_id) != (item.ref.lot_id, item.ref.gate_id):
            # A gateway speaks only for its own gate (the broker's ACL says which topics).
            self.stats.misaddressed += 1
            log.warning(
                "%s for %s/%s on %s ignored",
                message.type,
                message.lot_id,
                message.gate_id,
                item.topic,
            )
            return None
        if isinstance(message, GatewayStatus):
            record_status(db, message, now=now)
            self.stats.statuses += 1
            return None
        if record_reply(db, message, now=now):
            # An "open" the gate let expire unexecuted: the entry or exit is undone.
            self.stats.undone += command_not_executed(db, message, now=now, config=self.config)
        self.stats.replies += 1
        return None

    def _dead_letter(
        self, db: Session, item: Inbound, exc: Exception, now: datetime
    ) -> Reply | None:
        log.error("handling %s failed, kept as a dead letter", item.topic, exc_info=exc)
        event_id = item.message.event_id if isinstance(item.message, ScanEvent) else None
        with db.begin_nested():
            record_dead_letter(
                db,
                event_id=event_id,
                topic=item.topic,
                payload=item.payload,
                error=f"{type(exc).__name__}: {exc}"[:4000],
                now=now,
            )
        self.stats.dead_letters += 1
        if isinstance(item.message, ScanEvent):
            return internal_error_reply(item.message, item.ref, now=now, config=self.config)
        return None

    # -- the publisher ----------------------------------------------------------------------------
    async def _publish(self) -> None:
        while True:
            replies, sent, handled = await self._outbox.get()
            # Futures, not coroutines: gather wraps no task around each.
            results = await asyncio.gather(*sent, return_exceptions=True)
            for reply, result in zip(replies, results, strict=True):
                if isinstance(result, BaseException):
                    self.stats.publish_failures += 1
                    # The gateway redelivers the event and gets the stored answer again.
                    level = (
                        logging.INFO if isinstance(result, TransportUnavailable) else logging.ERROR
                    )
                    log.log(level, "publish to %s failed: %r", reply.topic, result)
                else:
                    self.stats.published += 1
            self._pending -= handled
            if self._pending <= 0:
                self._pending = 0
                self._idle.set()
