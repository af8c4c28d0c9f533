from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway_firmware.core.lane import (
    Action,
    BarrierFound,
    CloseGate,
    CodeDecoded,
    CommandReceived,
    CommandRecord,
    DecisionTimeout,
    Feedback,
    Lane,
    LaneState,
    OpenGate,
    PresenceChanged,
    PublishEvent,
    RecordOffline,
    SendReply,
    Show,
    Signal,
    SpendCode,
    Tick,
)
from gateway_firmware.core.local_verify import LocalVerifier
from parking_protocol.messages import CommandOutcome, GateCommand, new_id
from parking_protocol.qr_token import issue_code, verify_code
from parking_protocol.types import DENY_TEXT, Direction, GateAction, Reason

T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
DECISION = timedelta(seconds=3)
HOLD = timedelta(seconds=8)


def make_lane(key: Ed25519PrivateKey, *, allow: bool = True, **kwargs: Any) -> Lane:
    ids = (f"event-{i:04d}" for i in itertools.count(1))
    verifier = LocalVerifier({"k1": key.public_key()}, Direction.ENTRY, allow=allow)
    return Lane(
        lot_id="lot1",
        gate_id="in1",
        verifier=verifier,
        decision_timeout=DECISION,
        open_hold=HOLD,
        id_factory=lambda: next(ids),
        **kwargs,
    )


def command(
    event_id: str | None,
    now: datetime,
    *,
    action: GateAction = GateAction.OPEN,
    display: str = "Welcome",
    deadline: timedelta = timedelta(seconds=5),
    command_id: str | None = None,
    gate_id: str = "in1",
) -> GateCommand:
    return GateCommand(
        command_id=command_id or new_id(),
        event_id=event_id,
        lot_id="lot1",
        gate_id=gate_id,
        action=action,
        reason=Reason.WELCOME if action is GateAction.OPEN else Reason.ACCOUNT_BLOCKED,
        display=display,
        issued_at=now,
        deadline=now + deadline,
    )


def of(kind: type[Any], actions: list[Action]) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


@pytest.fixture
def key(signing_key: Ed25519PrivateKey) -> Ed25519PrivateKey:
    return signing_key


def code_for(key: Ed25519PrivateKey, now: datetime = T0, account: str = "alice") -> str:
    return issue_code(key, kid="k1", account_id=account, now=now)


def scan(lane: Lane, code: str, now: datetime = T0) -> str:
    actions = lane.handle(CodeDecoded(code), now)
    (publish,) = of(PublishEvent, actions)
    assert lane.state is LaneState.AWAITING_DECISION
    return str(publish.event_id)


def test_code_publishes_an_event_and_waits(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key)
    code = code_for(key)
    actions = lane.handle(CodeDecoded(code), T0)
    assert actions[0] == PublishEvent("event-0001", code, T0)
    assert of(OpenGate, actions) == []
    assert lane.awaiting_event_id == "event-0001"


def test_open_command_for_the_awaited_event_opens(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key)
    event_id = scan(lane, code_for(key))
    cmd = command(event_id, T0, display="Welcome alice")
    actions = lane.handle(CommandReceived(cmd), T0 + timedelta(seconds=1))
    assert of(OpenGate, actions) == [OpenGate()]
    assert Show("Welcome alice") in actions
    assert of(Signal, actions) == [Signal(Feedback.ACCEPTED)]
    assert SendReply(cmd.command_id, CommandOutcome.ACCEPTED) in actions
    assert lane.state is LaneState.OPEN


def test_deny_command_shows_the_reason_and_stays_closed(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key)
    event_id = scan(lane, code_for(key))
    text = DENY_TEXT[Reason.INSUFFICIENT_BALANCE]
    cmd = command(event_id, T0, action=GateAction.DENY, display=text)
    actions = lane.handle(CommandReceived(cmd), T0)
    assert of(OpenGate, actions) == []
    assert Show(text) in actions
    assert of(Signal, actions) == [Signal(Feedback.DENIED)]
    assert lane.state is LaneState.IDLE


def test_no_answer_within_the_timeout_decides_offline(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key)
    event_id = scan(lane, code_for(key))
    assert lane.handle(Tick(), T0 + DECISION - timedelta(milliseconds=1)) == []
    actions = lane.handle(Tick(), T0 + DECISION)
    (record,) = of(RecordOffline, actions)
    assert record.event_id == event_id
    assert (record.decision.action, record.decision.reason) == (GateAction.OPEN, Reason.WELCOME)
    assert of(OpenGate, actions) == [OpenGate()]
    # The late answer is refused: the lane already acted.
    late = command(event_id, T0)
    reply = lane.handle(CommandReceived(late), T0 + DECISION + timedelta(seconds=1))
    assert reply == [SendReply(late.command_id, CommandOutcome.REJECTED, "not awaiting this event")]


def test_an_open_for_a_scan_the_lane_no_longer_awaits_and_never_acted_on_is_expired(
    key: Ed25519PrivateKey,
) -> None:
    """The gateway restarted (or the driver scanned again) before the answer came: the
    barrier never moved for that scan, and the service must hear so (it undoes the entry
    on "expired"); "rejected" would leave it a stay for a car that never came in."""
    lane = make_lane(key)
    forgotten = scan(lane, code_for(key))
    restarted = make_lane(key)  # a fresh lane: what a power loss leaves
    late = command(forgotten, T0)
    reply = restarted.handle(CommandReceived(late, unanswered=True), T0 + timedelta(seconds=1))
    assert reply == [SendReply(late.command_id, CommandOutcome.EXPIRED, "no longer awaited")]
    assert of(OpenGate, reply) == []
    # Without the outbox saying the scan is still undecided, the lane cannot tell.
    other = command(forgotten, T0)
    reply = restarted.handle(CommandReceived(other), T0 + timedelta(seconds=1))
    assert reply == [
        SendReply(other.command_id, CommandOutcome.REJECTED, "not awaiting this event")
    ]


@pytest.mark.parametrize("online", [True, False])
def test_a_used_up_code_is_spent_before_the_barrier_moves(
    key: Ed25519PrivateKey, online: bool
) -> None:
    """The app keeps SpendCode on disk before it carries out OpenGate (a reboot forgets
    nothing); the nonce is the code's own and lives as long as the code."""
    lane = make_lane(key)
    code = code_for(key)
    event_id = scan(lane, code)
    if online:
        actions = lane.handle(CommandReceived(command(event_id, T0)), T0)
    else:
        actions = lane.handle(Tick(), T0 + DECISION)
    (spend,) = of(SpendCode, actions)
    assert actions.index(spend) < actions.index(OpenGate())
    claims = verify_code(code, {"k1": key.public_key()}, now=T0)
    assert spend == SpendCode(claims.nonce, claims.expires_at)
    assert spend.nonce in lane.verifier.nonces


def test_a_denied_code_is_not_spent(key: Ed25519PrivateKey) -> None:
    """After a deny (say, low balance) the driver may top up and show the same code again."""
    lane = make_lane(key)
    event_id = scan(lane, code_for(key))
    deny = command(event_id, T0, action=GateAction.DENY, display="Top up")
    assert of(SpendCode, lane.handle(CommandReceived(deny), T0)) == []


@pytest.mark.parametrize(
    ("make_code", "reason"),
    [
        (lambda key: "QP1.k1.alice.1.2.bm9uY2U.c2ln", Reason.CODE_MALFORMED),
        (lambda key: "https://example.com/not-a-parking-code", Reason.CODE_MALFORMED),
        (lambda key: code_for(Ed25519PrivateKey.generate()), Reason.CODE_BAD_SIGNATURE),
        (lambda key: code_for(key, now=T0 - timedelta(minutes=5)), Reason.CODE_EXPIRED),
    ],
)
def test_bad_code_is_refused_locally_without_an_event(
    key: Ed25519PrivateKey, make_code: Callable[[Ed25519PrivateKey], str], reason: Reason
) -> None:
    lane = make_lane(key)
    actions = lane.handle(CodeDecoded(make_code(key)), T0)
    assert of(PublishEvent, actions) == []
    assert of(OpenGate, actions) == []
    assert actions == [Show(DENY_TEXT[reason]), Signal(Feedback.DENIED)]
    assert lane.state is LaneState.IDLE
    assert lane.local_denials[reason] == 1


def test_timeout_for_another_event_is_ignored(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key)
    scan(lane, code_for(key))
    assert lane.handle(DecisionTimeout("event-9999"), T0) == []
    assert lane.state is LaneState.AWAITING_DECISION


def test_command_past_its_deadline_is_refused_as_expired(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key)
    event_id = scan(lane, code_for(key))
    cmd = command(event_id, T0, deadline=timedelta(seconds=1))
    actions = lane.handle(CommandReceived(cmd), T0 + timedelta(seconds=2))
    assert actions == [SendReply(cmd.command_id, CommandOutcome.EXPIRED, "deadline passed")]
    assert lane.state is LaneState.AWAITING_DECISION


def test_redelivered_deny_repeats_its_answer_and_leaves_the_new_scan_alone(
    key: Ed25519PrivateKey,
) -> None:
    lane = make_lane(key)
    event_id = scan(lane, code_for(key))
    cmd = command(event_id, T0, action=GateAction.DENY, display="no")
    first = lane.handle(CommandReceived(cmd), T0)
    assert SendReply(cmd.command_id, CommandOutcome.DONE) in first
    # The same command again (QoS 1 redelivery), even once the lane awaits a new scan.
    scan(lane, code_for(key, account="bob"), T0 + timedelta(seconds=1))
    again = GateCommand.model_validate({**cmd.model_dump(), "event_id": lane.awaiting_event_id})
    actions = lane.handle(CommandReceived(again), T0 + timedelta(seconds=1))
    assert actions == [SendReply(cmd.command_id, CommandOutcome.DONE, repeat=True)]
    assert lane.state is LaneState.AWAITING_DECISION


def test_redelivered_open_gets_the_same_answer_and_does_not_act_again(
    key: Ed25519PrivateKey,
) -> None:
    """The service's first reply was lost: asking again tells it what happened."""
    lane = make_lane(key)
    cmd = command(scan(lane, code_for(key)), T0)
    assert of(OpenGate, lane.handle(CommandReceived(cmd), T0)) == [OpenGate()]
    opened_until = lane._open_until
    again = lane.handle(CommandReceived(cmd), T0 + timedelta(seconds=1))
    assert again == [SendReply(cmd.command_id, CommandOutcome.ACCEPTED, repeat=True)]
    assert lane._open_until == opened_until  # the hold was not restarted either
    lane.handle(Tick(), T0 + HOLD)  # closes
    after_close = lane.handle(CommandReceived(cmd), T0 + HOLD)
    assert after_close == [SendReply(cmd.command_id, CommandOutcome.DONE, "closed", repeat=True)]
    assert lane.command_record(cmd.command_id) == CommandRecord(
        cmd.command_id, CommandOutcome.DONE, "closed"
    )


def test_stale_open_never_lifts_the_barrier(key: Ed25519PrivateKey) -> None:
    """After a reconnect: an open delivered past its deadline is refused as expired, and an
    open that was already carried out, redelivered late, only repeats its answer."""
    lane = make_lane(key)
    done = command(None, T0, display="Opened by operator")
    lane.handle(CommandReceived(done), T0)
    lane.handle(Tick(), T0 + HOLD)
    stale = command(None, T0, display="Opened by operator")
    late = T0 + timedelta(minutes=10)
    expired = lane.handle(CommandReceived(stale), late)
    assert expired == [SendReply(stale.command_id, CommandOutcome.EXPIRED, "deadline passed")]
    for cmd, answer in (
        (done, SendReply(done.command_id, CommandOutcome.DONE, "closed", repeat=True)),
        (stale, SendReply(stale.command_id, CommandOutcome.EXPIRED, "deadline passed", True)),
    ):
        actions = lane.handle(CommandReceived(cmd), late + timedelta(seconds=1))
        assert actions == [answer]
    assert lane.state is LaneState.IDLE


def test_remembered_answers_survive_into_a_new_lane(key: Ed25519PrivateKey) -> None:
    """A restarted gateway hands its persisted answers to the new lane: a manual open
    redelivered after the restart, still within its deadline, does not open again."""
    cmd = command(None, T0)
    record = CommandRecord(cmd.command_id, CommandOutcome.ACCEPTED)
    lane = make_lane(key, known_commands=[record])
    actions = lane.handle(CommandReceived(cmd), T0)
    assert actions == [SendReply(cmd.command_id, CommandOutcome.ACCEPTED, repeat=True)]
    assert lane.state is LaneState.IDLE


def test_command_memory_is_bounded_oldest_first(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key, seen_commands=3)
    sent = [command(None, T0, action=GateAction.DENY, display=f"m{i}") for i in range(4)]
    for cmd in sent:
        lane.handle(CommandReceived(cmd), T0)
    assert [r.command_id for r in lane.command_records()] == [c.command_id for c in sent[1:]]
    assert lane.command_record(sent[0].command_id) is None


def test_lane_states_follow_the_issue(key: Ed25519PrivateKey) -> None:
    """idle -> vehicle present -> (code read) waiting for decision -> barrier open ->
    (vehicle passed) barrier closed: idle."""
    lane = make_lane(key)
    assert lane.state is LaneState.IDLE
    lane.handle(PresenceChanged(True), T0)
    assert lane.state is LaneState.VEHICLE_PRESENT
    event_id = scan(lane, code_for(key))
    assert lane.state is LaneState.AWAITING_DECISION
    lane.handle(CommandReceived(command(event_id, T0)), T0)
    assert lane.state is LaneState.OPEN
    assert of(CloseGate, lane.handle(PresenceChanged(False), T0 + timedelta(seconds=2)))
    assert lane.state is LaneState.IDLE
    lane.handle(PresenceChanged(True), T0 + timedelta(seconds=3))  # the next car
    assert lane.state is LaneState.VEHICLE_PRESENT


def test_a_locally_refused_code_returns_to_vehicle_present(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key)
    lane.handle(PresenceChanged(True), T0)
    lane.handle(CodeDecoded("junk"), T0)
    assert lane.state is LaneState.VEHICLE_PRESENT


def test_command_for_another_event_or_gate_is_refused(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key)
    scan(lane, code_for(key))
    stray = command("event-0777", T0)
    assert of(SendReply, lane.handle(CommandReceived(stray), T0))[0].outcome is (
        CommandOutcome.REJECTED
    )
    wrong_gate = command(lane.awaiting_event_id, T0, gate_id="in2")
    actions = lane.handle(CommandReceived(wrong_gate), T0)
    assert of(OpenGate, actions) == []
    assert of(SendReply, actions)[0].outcome is CommandOutcome.REJECTED


def test_manual_open_needs_no_event(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key)
    actions = lane.handle(CommandReceived(command(None, T0, display="Opened by operator")), T0)
    assert of(OpenGate, actions) == [OpenGate()]
    assert lane.state is LaneState.OPEN


def test_codes_are_ignored_while_the_lane_is_busy(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key)
    scan(lane, code_for(key))
    assert lane.handle(CodeDecoded(code_for(key, account="bob")), T0) == []


def test_scan_only_when_present(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key, scan_only_when_present=True)
    assert lane.handle(CodeDecoded(code_for(key)), T0) == []
    lane.handle(PresenceChanged(True), T0)
    assert of(PublishEvent, lane.handle(CodeDecoded(code_for(key)), T0))


def test_without_detector_the_barrier_closes_after_open_hold(key: Ed25519PrivateKey) -> None:
    lane = make_lane(key)
    cmd = command(scan(lane, code_for(key)), T0)
    lane.handle(CommandReceived(cmd), T0)
    assert of(CloseGate, lane.handle(Tick(), T0 + HOLD - timedelta(milliseconds=1))) == []
    actions = lane.handle(Tick(), T0 + HOLD)
    assert of(CloseGate, actions) == [CloseGate()]
    assert SendReply(cmd.command_id, CommandOutcome.DONE, "closed") in actions
    assert lane.state is LaneState.IDLE


def test_with_detector_the_barrier_closes_once_the_vehicle_has_passed(
    key: Ed25519PrivateKey,
) -> None:
    lane = make_lane(key)
    lane.handle(PresenceChanged(True), T0)
    lane.handle(CommandReceived(command(scan(lane, code_for(key)), T0)), T0)
    # Still under the barrier long after the hold time: stays open.
    assert of(CloseGate, lane.handle(Tick(), T0 + HOLD * 10)) == []
    assert of(CloseGate, lane.handle(PresenceChanged(False), T0 + HOLD * 10)) == [CloseGate()]


def test_with_detector_a_vehicle_that_never_came_closes_after_hold(
    key: Ed25519PrivateKey,
) -> None:
    lane = make_lane(key)
    lane.handle(PresenceChanged(False), T0)
    lane.handle(CommandReceived(command(scan(lane, code_for(key)), T0)), T0)
    assert of(CloseGate, lane.handle(Tick(), T0 + HOLD)) == [CloseGate()]


# -- the barrier-safety rule, property-tested ------------------------------------------------------
class LaneSafety(RuleBasedStateMachine):
    """Random presence changes, scans, commands, timeouts and ticks: never a close on a car."""

    def __init__(self) -> None:
        super().__init__()
        self.key = Ed25519PrivateKey.generate()
        self.lane = make_lane(self.key)
        self.now = T0
        self.present = False
        self.gate_open = False
        self.opened_at: datetime | None = None
        self.sent: list[GateCommand] = []
        self.answers: dict[str, SendReply] = {}  # command_id -> its latest (first-time) answer

    def feed(self, event: Any) -> list[Action]:
        actions = self.lane.handle(event, self.now)
        for action in actions:
            if isinstance(action, CloseGate):
                assert not self.present, f"CloseGate while a vehicle is present: {event}"
                self.gate_open = False
            elif isinstance(action, OpenGate):
                assert not self.gate_open, "OpenGate while already open"
                self.gate_open = True
                self.opened_at = self.now
            elif isinstance(action, SendReply) and not action.repeat:
                assert action.command_id not in self.answers or action.outcome is (
                    CommandOutcome.DONE
                ), f"a command id answered twice: {action}"
                self.answers[action.command_id] = action
        return actions

    @rule(present=st.booleans())
    def presence(self, present: bool) -> None:
        self.present = present
        self.feed(PresenceChanged(present))

    @rule(valid=st.booleans(), account=st.sampled_from(["alice", "bob", "mallory"]))
    def code(self, valid: bool, account: str) -> None:
        text = code_for(self.key, self.now, account) if valid else f"junk-{account}"
        self.feed(CodeDecoded(text))

    @rule(
        action=st.sampled_from(GateAction),
        late=st.booleans(),
        manual=st.booleans(),
        stray=st.booleans(),
    )
    def command(self, action: GateAction, late: bool, manual: bool, stray: bool) -> None:
        event_id = None if manual else ("event-stray" if stray else self.lane.awaiting_event_id)
        cmd = command(event_id, self.now, action=action, deadline=timedelta(seconds=2))
        self.sent.append(cmd)
        if late:
            self.now += timedelta(seconds=3)
        self.feed(CommandReceived(cmd))

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        cmd = data.draw(st.sampled_from(self.sent))
        first = self.answers[cmd.command_id]
        actions = self.feed(CommandReceived(cmd))
        # Never executed twice: the same answer again, and nothing else.
        assert actions == [SendReply(cmd.command_id, first.outcome, first.detail, repeat=True)]

    @rule()
    def timeout(self) -> None:
        if self.lane.awaiting_event_id is not None:
            self.feed(DecisionTimeout(self.lane.awaiting_event_id))

    @rule(seconds=st.floats(min_value=0, max_value=20))
    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.feed(Tick())
        open_until = self.lane._open_until
        if self.gate_open and not self.present:
            assert open_until is not None
            assert self.now < open_until, "an empty lane stayed open past its hold time"

    @invariant()
    def gate_state_matches_lane(self) -> None:
        assert self.gate_open == (self.lane.state is LaneState.OPEN)
        if self.lane.state in (LaneState.IDLE, LaneState.VEHICLE_PRESENT):
            assert self.lane.awaiting_event_id is None
            assert (self.lane.state is LaneState.VEHICLE_PRESENT) == self.present


LaneSafety.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_barrier_never_closes_on_a_vehicle = LaneSafety.TestCase


def test_property_machine_can_fail(key: Ed25519PrivateKey) -> None:
    """Guard the guard: closing on a vehicle trips the machine's assertion."""
    machine = LaneSafety()
    machine.present = True
    machine.lane.vehicle_present = False  # a lane that missed the arrival would close
    machine.feed(CommandReceived(command(None, T0)))
    machine.now += HOLD
    with pytest.raises(AssertionError, match="CloseGate while a vehicle is present"):
        machine.feed(Tick())


def test_a_barrier_found_up_at_start_closes_once_the_lane_is_clear(
    key: Ed25519PrivateKey,
) -> None:
    """After a power loss with the barrier up, the next cars do not drive through for free;
    and a car still under it is never closed on."""
    lane = make_lane(key)
    lane.handle(PresenceChanged(True), T0)
    assert lane.handle(BarrierFound(), T0) == []  # a car under it: stays up
    assert lane.state is LaneState.OPEN
    actions = lane.handle(PresenceChanged(False), T0 + timedelta(seconds=2))
    assert any(isinstance(a, CloseGate) for a in actions)
    assert lane.state is LaneState.IDLE

    empty = make_lane(key)
    assert any(isinstance(a, CloseGate) for a in empty.handle(BarrierFound(), T0))
    assert empty.state is LaneState.IDLE


def test_next_deadline_is_when_a_tick_next_acts(key: Ed25519PrivateKey) -> None:
    """Lane.next_deadline: a Tick before it does nothing (callers may skip those ticks)."""
    lane = make_lane(key)
    assert lane.next_deadline is None  # idle: no tick ever acts
    lane.handle(CodeDecoded(code_for(key, T0)), T0)
    assert lane.next_deadline == T0 + DECISION
    assert lane.handle(Tick(), T0 + DECISION - timedelta(milliseconds=1)) == []
    assert lane.state is LaneState.AWAITING_DECISION
    actions = lane.handle(Tick(), T0 + DECISION)  # decided offline: opens
    assert of(OpenGate, actions) == [OpenGate()]
    assert lane.next_deadline == T0 + DECISION + HOLD
    lane.handle(PresenceChanged(True), T0 + DECISION)
    assert of(CloseGate, lane.handle(Tick(), T0 + DECISION + HOLD)) == []  # a car: stays up
    assert lane.next_deadline == T0 + DECISION + HOLD  # past: every tick checks again
    lane.handle(PresenceChanged(False), T0 + DECISION + HOLD)  # passed: closed at once
    assert lane.state is LaneState.IDLE
    assert lane.next_deadline is None
