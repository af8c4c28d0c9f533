"""The lane as a pure state machine: inputs in, a list of actions out, no IO.

::

    IDLE <--detector--> VEHICLE_PRESENT
      |                     |  code read (local check passes): publish the event
      +---------------------+--> AWAITING_DECISION --OPEN command / offline allow--> OPEN
      ^                             |  deny command / offline deny: show the reason   |
      |<----------------------------+                                                 |
      |<---- vehicle passed (detector) or open_hold elapsed, and no vehicle present --+
                                   (barrier closed)

Issue 4 names the lane's steps *idle -> vehicle present -> code read -> waiting for
decision -> barrier open -> vehicle passed -> barrier closed*. :attr:`Lane.state` is the
step the lane rests in between two inputs:

- idle: ``IDLE`` (barrier closed, nothing awaited, no vehicle on the detector);
- vehicle present: ``VEHICLE_PRESENT`` (the same, with the detector reporting a vehicle);
- code read: the :class:`CodeDecoded` step itself. A code the local check refuses goes
  straight back (the reason shown); a good one is published, and in the same step the
  lane is
- waiting for decision: ``AWAITING_DECISION``;
- barrier open: ``OPEN`` (until the vehicle has passed or, if none came, ``open_hold``;
  never closing while the detector reports a vehicle);
- vehicle passed: the :class:`PresenceChanged` step that clears the detector after it saw
  the vehicle; it closes the barrier at once, so
- barrier closed: is ``IDLE`` again (``VEHICLE_PRESENT`` if the next car is already there).

"Code read" and "vehicle passed" are transitions, not resting states: nothing can happen
between them and the next step, so the machine never stays there.

The app feeds :meth:`Lane.handle` an input and the current time and carries out the actions
it returns (publish, open/close the barrier, show text, reply to a command). Safety rule:
**the lane never emits CloseGate while the detector reports a vehicle.**

A command is executed only if it answers the event the lane awaits (or is an operator's
manual open, ``event_id=None``) and its deadline has not passed; anything else gets a
rejected/expired reply. Each ``command_id``'s answer is remembered (the most recent
``seen_commands`` of them; the app persists them and hands them back after a restart): a
redelivered command is never executed again, it gets the same answer again
(``SendReply(repeat=True)``), so a service whose first reply was lost learns what happened.
A stale open therefore never lifts the barrier: a new one past its deadline is refused as
expired, a redelivered one only repeats its first answer. Without an answer within the
decision timeout the lane decides with the local verifier's offline policy and records
that decision so the event is replayed with ``offline`` set.

A code the lane uses up (the service opened for it, or the lane decided it offline) is
named by a :class:`SpendCode` action ahead of the barrier moving: the app keeps the nonce
on disk and gives it back to the next run's verifier, so a screenshot of a code still
within its lifetime is refused as replayed even after a reboot.

>>> # lane = Lane(lot_id="lot1", gate_id="in1", verifier=verifier, ...)
>>> # lane.handle(CodeDecoded("QP1..."), now)
>>> # [PublishEvent(event_id='...', code='QP1...', scanned_at=...), Show(text='Checking...'), ...]
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from gateway_firmware.core.local_verify import LocalVerifier, SpentNonce, offline_display_text
from parking_protocol.messages import CommandOutcome, GateCommand, OfflineDecision, new_id
from parking_protocol.types import DENY_TEXT, GateAction, Reason

__all__ = [
    "CHECKING_TEXT",
    "IDLE_TEXT",
    "Action",
    "BarrierFound",
    "CloseGate",
    "CodeDecoded",
    "CommandReceived",
    "CommandRecord",
    "DecisionTimeout",
    "Feedback",
    "Lane",
    "LaneInput",
    "LaneState",
    "OpenGate",
    "PresenceChanged",
    "PublishEvent",
    "RecordOffline",
    "SendReply",
    "Show",
    "Signal",
    "SpendCode",
    "StartTimer",
    "Tick",
    "TimerKind",
]

IDLE_TEXT = "Show your parking code"
CHECKING_TEXT = "Checking..."


class LaneState(StrEnum):
    """Where the lane rests between two inputs (see the module docstring for issue 4's names)."""

    IDLE = "idle"
    VEHICLE_PRESENT = "vehicle_present"
    AWAITING_DECISION = "awaiting_decision"
    OPEN = "open"


class Feedback(StrEnum):
    """What the lamps and buzzer tell the driver, beyond the text."""

    ACCEPTED = "accepted"  # the barrier opens for you
    DENIED = "denied"  # it does not: read the display


class TimerKind(StrEnum):
    DECISION = "decision"
    HOLD_OPEN = "hold_open"


# -- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CodeDecoded:
    """A (debounced) code text read by the camera."""

    code: str


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """A command for this gate. ``decided_offline``: what the lane already did on its own
    for the scan the command answers (the app knows it from the outbox), if anything.
    ``unanswered``: that scan is still in the outbox with no decision at all (the lane
    never acted on it), so a command the lane no longer waits for did not move the barrier."""

    command: GateCommand
    decided_offline: GateAction | None = None
    unanswered: bool = False


@dataclass(frozen=True, slots=True)
class DecisionTimeout:
    """No decision will come for ``event_id`` (timer fired, or the uplink is down)."""

    event_id: str


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    present: bool


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: deadlines (decision, hold open) are checked against ``now``."""


@dataclass(frozen=True, slots=True)
class BarrierFound:
    """At start (after a crash or a power loss): the barrier is up although nothing here
    opened it. It is closed like any open barrier — once the lane is clear, never on a car."""


LaneInput = CodeDecoded | CommandReceived | DecisionTimeout | PresenceChanged | Tick | BarrierFound


# -- actions -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PublishEvent:
    """Persist to the outbox, then publish a ScanEvent (the app assigns seq and boot)."""

    event_id: str
    code: str
    scanned_at: datetime


@dataclass(frozen=True, slots=True)
class RecordOffline:
    """The lane decided ``event_id`` itself: replay it with ``offline=decision``."""

    event_id: str
    decision: OfflineDecision


@dataclass(frozen=True, slots=True)
class SpendCode:
    """A code is used up at this lane: keep its nonce durably until ``expires_at`` (before
    the barrier moves), so a restarted lane still refuses it as replayed."""

    nonce: str
    expires_at: datetime

    @classmethod
    def of(cls, spent: SpentNonce) -> SpendCode:
        return cls(spent.nonce, spent.expires_at)


@dataclass(frozen=True, slots=True)
class OpenGate:
    pass


@dataclass(frozen=True, slots=True)
class CloseGate:
    pass


@dataclass(frozen=True, slots=True)
class Show:
    text: str


@dataclass(frozen=True, slots=True)
class Signal:
    """Light/sound feedback for the driver (LEDs, buzzer) with a decision."""

    feedback: Feedback


@dataclass(frozen=True, slots=True)
class StartTimer:
    """A deadline the lane will act on at the first :class:`Tick` at or after ``at``."""

    kind: TimerKind
    at: datetime


@dataclass(frozen=True, slots=True)
class SendReply:
    """Reply to a command. ``repeat``: a redelivered command's remembered answer, sent
    again; nothing was done this time (and there is nothing new to remember)."""

    command_id: str
    outcome: CommandOutcome
    detail: str = ""
    repeat: bool = False


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """The latest answer the lane gave to ``command_id`` (an ``open`` moves from accepted
    to done when the barrier closes). The app persists these and passes them back to a new
    :class:`Lane` (``known_commands``) so a restart forgets no answer."""

    command_id: str
    outcome: CommandOutcome
    detail: str = ""


Action = (
    PublishEvent
    | RecordOffline
    | SpendCode
    | OpenGate
    | CloseGate
    | Show
    | Signal
    | StartTimer
    | SendReply
)


@dataclass(frozen=True, slots=True)
class _Awaiting:
    event_id: str
    code: str
    deadline: datetime


class Lane:
    """One lane's decisions. Not thread-safe: the app feeds it from one event loop."""

    def __init__(
        self,
        *,
        lot_id: str,
        gate_id: str,
        verifier: LocalVerifier,
        decision_timeout: timedelta,
        open_hold: timedelta,
        scan_only_when_present: bool = False,
        id_factory: Callable[[], str] = new_id,
        seen_commands: int = 1024,
        known_commands: Iterable[CommandRecord] = (),
    ) -> None:
        self.lot_id = lot_id
        self.gate_id = gate_id
        self.verifier = verifier
        self.decision_timeout = decision_timeout
        self.open_hold = open_hold
        self.scan_only_when_present = scan_only_when_present
        self._new_id = id_factory
        self.command_memory = seen_commands
        self.local_denials: Counter[Reason] = Counter()
        # command_id -> its latest answer, oldest first (bounded by seen_commands).
        self._commands: OrderedDict[str, CommandRecord] = OrderedDict()
        for record in known_commands:
            self._remember(record)
        self._phase = LaneState.IDLE  # IDLE, AWAITING_DECISION or OPEN
        self.vehicle_present = False
        self._awaiting: _Awaiting | None = None
        self._open_until: datetime | None = None
        self._vehicle_seen_while_open = False
        self._opened_by: str | None = None

    @property
    def state(self) -> LaneState:
        """The step the lane rests in (``VEHICLE_PRESENT``: idle with a vehicle detected)."""
        if self._phase is LaneState.IDLE and self.vehicle_present:
            return LaneState.VEHICLE_PRESENT
        return self._phase

    @property
    def awaiting_event_id(self) -> str | None:
        return self._awaiting.event_id if self._awaiting else None

    @property
    def next_deadline(self) -> datetime | None:
        """When a :class:`Tick` next has something to do: the decision timeout while
        awaiting one, the end of the hold while open (past, while a vehicle keeps the
        barrier up); None while neither. A Tick before it returns no actions and changes
        nothing, so a caller may skip those."""
        if self._phase is LaneState.AWAITING_DECISION and self._awaiting is not None:
            return self._awaiting.deadline
        if self._phase is LaneState.OPEN:
            return self._open_until
        return None

    def command_record(self, command_id: str) -> CommandRecord | None:
        """The remembered answer to ``command_id`` (None: unknown, or forgotten by now)."""
        return self._commands.get(command_id)

    def command_records(self) -> list[CommandRecord]:
        """Every remembered answer, oldest first."""
        return list(self._commands.values())

    def handle(self, event: LaneInput, now: datetime) -> list[Action]:
        """Advance the machine by one input at ``now``; return what to do."""
        match event:
            case CodeDecoded(code):
                return self._on_code(code, now)
            case CommandReceived(command, decided_offline, unanswered):
                return self._on_command(command, now, decided_offline, unanswered=unanswered)
            case DecisionTimeout(event_id):
                if self._awaiting is not None and self._awaiting.event_id == event_id:
                    return self._decide_offline(now)
                return []
            case PresenceChanged(present):
                return self._on_presence(present, now)
            case Tick():
                return self._on_tick(now)
            case BarrierFound():
                return self._on_barrier_found(now)

    # -- transitions -----------------------------------------------------------------------
    def _on_code(self, code: str, now: datetime) -> list[Action]:
        if self._phase is not LaneState.IDLE:
            return []  # one vehicle at a time; the code is read again later if still shown
        if self.scan_only_when_present and not self.vehicle_present:
            return []
        # Local verification first: a code that cannot be valid (malformed, forged, unknown
        # key, expired, already used here, deny-listed) is refused at once, without a round
        # trip. The central service re-verifies everything it is sent.
        checked = self.verifier.check(code, now)
        if isinstance(checked, Reason):
            self.local_denials[checked] += 1
            return [Show(DENY_TEXT.get(checked, "Code not valid")), Signal(Feedback.DENIED)]
        deadline = now + self.decision_timeout
        self._awaiting = _Awaiting(self._new_id(), code, deadline)
        self._phase = LaneState.AWAITING_DECISION
        return [
            PublishEvent(self._awaiting.event_id, code, now),
            Show(CHECKING_TEXT),
            StartTimer(TimerKind.DECISION, deadline),
        ]

    def _on_command(
        self,
        command: GateCommand,
        now: datetime,
        decided_offline: GateAction | None = None,
        *,
        unanswered: bool = False,
    ) -> list[Action]:
        cid = command.command_id
        if (command.lot_id, command.gate_id) != (self.lot_id, self.gate_id):
            return [SendReply(cid, CommandOutcome.REJECTED, "command for another gate")]
        known = self._commands.get(cid)
        if known is not None:
            # Redelivered (QoS 1 after a lost PUBACK, a reconnect, or the service asking
            # again because our reply was lost): say again what happened, do nothing.
            return [SendReply(cid, known.outcome, known.detail, repeat=True)]
        if now > command.deadline:
            if decided_offline is not None:
                # Not carried out, but the lane had acted on that scan itself: "expired"
                # would tell the service the barrier never moved for it.
                detail = f"decided offline: {decided_offline.value}"
                return [self._reply(cid, CommandOutcome.REJECTED, detail)]
            return [self._reply(cid, CommandOutcome.EXPIRED, "deadline passed")]
        if command.event_id is None:  # operator's manual command
            if command.action is GateAction.OPEN:
                self._awaiting = None  # a later answer to that scan is refused
                opened = self._open(now, command.display, cid)
                return [*opened, self._reply(cid, CommandOutcome.ACCEPTED)]
            return [Show(command.display), self._reply(cid, CommandOutcome.DONE)]
        awaiting = self._awaiting
        if awaiting is None or awaiting.event_id != command.event_id:
            if unanswered and decided_offline is None:
                # The lane forgot the scan (it restarted) or moved on to another: the
                # barrier never moved for it, so the service must undo what it decided
                # ("expired" means exactly that to it), or a stay stays open unparked.
                return [self._reply(cid, CommandOutcome.EXPIRED, "no longer awaited")]
            return [self._reply(cid, CommandOutcome.REJECTED, "not awaiting this event")]
        self._awaiting = None
        if command.action is GateAction.OPEN:
            # Only a code that opened the gate is used up; after a deny (say, insufficient
            # balance) the driver may top up and show the same code again.
            spent = self.verifier.remember(awaiting.code, now)
            return [
                *([SpendCode.of(spent)] if spent is not None else []),
                *self._open(now, command.display, cid),
                self._reply(cid, CommandOutcome.ACCEPTED),
            ]
        self._phase = LaneState.IDLE
        return [
            Show(command.display),
            Signal(Feedback.DENIED),
            self._reply(cid, CommandOutcome.DONE),
        ]

    def _reply(self, command_id: str, outcome: CommandOutcome, detail: str = "") -> SendReply:
        """Answer ``command_id`` and remember the answer for a redelivery."""
        self._remember(CommandRecord(command_id, outcome, detail))
        return SendReply(command_id, outcome, detail)

    def _remember(self, record: CommandRecord) -> None:
        self._commands[record.command_id] = record  # an update keeps its place
        while len(self._commands) > self.command_memory:
            self._commands.popitem(last=False)

    def _on_presence(self, present: bool, now: datetime) -> list[Action]:
        self.vehicle_present = present
        if self._phase is not LaneState.OPEN:
            return []
        if present:
            self._vehicle_seen_while_open = True
            return []
        if self._vehicle_seen_while_open:  # the vehicle has passed
            return self._close()
        return self._on_tick(now)

    def _on_tick(self, now: datetime) -> list[Action]:
        awaiting, open_until = self._awaiting, self._open_until
        if self._phase is LaneState.AWAITING_DECISION and awaiting and now >= awaiting.deadline:
            return self._decide_offline(now)
        if self._phase is LaneState.OPEN and open_until is not None and now >= open_until:
            return self._close()
        return []

    def _on_barrier_found(self, now: datetime) -> list[Action]:
        if self._phase is not LaneState.IDLE:
            return []
        self._phase = LaneState.OPEN
        self._open_until = now  # nobody is owed a hold: close as soon as the lane is clear
        self._vehicle_seen_while_open = self.vehicle_present
        self._opened_by = None
        return self._on_tick(now)

    def _decide_offline(self, now: datetime) -> list[Action]:
        awaiting = self._awaiting
        if awaiting is None:
            return []
        self._awaiting = None
        decision, spent = self.verifier.decide_spending(awaiting.code, now)
        text = offline_display_text(decision, self.verifier.direction)
        actions: list[Action] = [RecordOffline(awaiting.event_id, decision)]
        if spent is not None:
            actions.insert(0, SpendCode.of(spent))
        if decision.action is GateAction.OPEN:
            return actions + self._open(now, text, None)
        self._phase = LaneState.IDLE
        return [*actions, Show(text), Signal(Feedback.DENIED)]

    def _open(self, now: datetime, text: str, command_id: str | None) -> list[Action]:
        was_open = self._phase is LaneState.OPEN
        self._phase = LaneState.OPEN
        self._open_until = now + self.open_hold
        self._vehicle_seen_while_open = self.vehicle_present or (
            was_open and self._vehicle_seen_while_open
        )
        self._opened_by = command_id
        actions: list[Action] = [] if was_open else [OpenGate()]
        return [
            *actions,
            Show(text),
            Signal(Feedback.ACCEPTED),
            StartTimer(TimerKind.HOLD_OPEN, self._open_until),
        ]

    def _close(self) -> list[Action]:
        if self.vehicle_present:  # the safety rule, whatever led here
            return []
        self._phase = LaneState.IDLE
        self._open_until = None
        self._vehicle_seen_while_open = False
        actions: list[Action] = [CloseGate(), Show(IDLE_TEXT)]
        if self._opened_by is not None:
            actions.append(self._reply(self._opened_by, CommandOutcome.DONE, "closed"))
            self._opened_by = None
        return actions
