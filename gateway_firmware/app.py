"""The composition root: build a lane controller from settings, hardware, a transport and a clock.

The scan loop reads the camera and decodes frames in worker threads (``asyncio.to_thread``)
so the event loop stays responsive; codes go through the debouncer into the pure
:class:`~gateway_firmware.core.lane.Lane`, whose actions this module carries out: write the
event to the outbox and publish it, open/close the barrier, show text, reply to commands.
Deadlines are checked by a periodic tick against ``clock.now()``, so a test's FakeClock
drives timeouts deterministically.

>>> # gateway = build_gateway(settings, hardware=real_hardware(settings),
>>> #     transport=make_transport(settings, boot=outbox.boot), clock=SystemClock(), outbox=outbox)
>>> # await gateway.run()   # until gateway.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import math
import os
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from gateway_firmware.config import CameraSettings, ConfigError, GatewaySettings
from gateway_firmware.core.debounce import Debouncer
from gateway_firmware.core.lane import (
    IDLE_TEXT,
    Action,
    BarrierFound,
    CloseGate,
    CodeDecoded,
    CommandReceived,
    CommandRecord,
    DecisionTimeout,
    Lane,
    LaneInput,
    OpenGate,
    PresenceChanged,
    PublishEvent,
    RecordOffline,
    SendReply,
    Show,
    Signal,
    SpendCode,
    StartTimer,
    Tick,
)
from gateway_firmware.core.local_verify import LocalVerifier, SpentNonce
from gateway_firmware.hardware.interfaces import (
    AsyncCamera,
    Camera,
    CameraError,
    Decoder,
    Display,
    Frame,
    Gate,
    Indicator,
    PresenceDetector,
)
from gateway_firmware.uplink.link import Inbound, Uplink, status_will
from gateway_firmware.uplink.outbox import Outbox
from parking_protocol.clock import Clock
from parking_protocol.messages import (
    CommandOutcome,
    CommandReply,
    DenyList,
    EventAck,
    GateCommand,
    GatewayState,
    GatewayStatus,
    OfflineDecision,
    ScanEvent,
    new_id,
)
from parking_protocol.transport import Transport
from parking_protocol.types import GateAction

__all__ = [
    "FileDisplay",
    "Gateway",
    "GatewayStats",
    "Hardware",
    "LoggingDisplay",
    "TickSource",
    "Tuning",
    "build_gateway",
    "camera_opener",
    "make_transport",
    "real_hardware",
    "resend_due",
    "status_will",
    "tls_context",
]

log = logging.getLogger(__name__)

# How many recent command ids a gateway remembers the answers to (in memory and on disk).
COMMAND_MEMORY = 512
_TICK = Tick()


@dataclass
class Hardware:
    """The devices of one lane. ``presence`` is None when the lane has no vehicle detector,
    ``indicator`` when it has no lamps or buzzer to signal with.

    ``on_close`` callbacks release resources (GPIO pins) when the gateway shuts down.
    """

    camera: Camera | AsyncCamera
    decoder: Decoder
    gate: Gate
    display: Display
    presence: PresenceDetector | None = None
    indicator: Indicator | None = None
    on_close: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.camera.close()
        for release in self.on_close:
            try:
                release()
            except Exception:
                log.exception("releasing a device failed")


def resend_due(oldest: str | None, pending: Sequence[str]) -> bool:
    """Whether the unanswered events go again: the oldest of those waiting at the last
    check (``oldest``) is still in the outbox (``pending``, oldest first) a whole interval
    later.

    The service answers a gateway's events in the order they reach it, so a service working
    through a backlog (after a partition, say) answers the oldest first: sending the whole
    outbox again then would only queue copies behind the originals (a resend storm, 3-4x
    the events). An oldest event unanswered for an interval was lost (a broker that
    accepted it had nobody subscribed, or restarted empty): everything goes again."""
    return oldest is not None and oldest in pending


@dataclass(frozen=True)
class Tuning:
    """Loop timings (real seconds); tests shorten them."""

    tick_s: float = 0.05
    idle_sleep_s: float = 0.02
    camera_backoff_initial_s: float = 0.5
    camera_backoff_max_s: float = 10.0
    resend_s: float = 5.0
    """While connected, events still unanswered after one to two of these are sent again
    (a PUBACK is not durability: a broker restarted empty, or one with no service
    subscribed yet, accepted and dropped them)."""


class TickSource(Protocol):
    """What calls a gateway's :meth:`~Gateway.tick` every ``tick_s``, when not its own loop.

    A gateway on a Pi ticks from a loop of its own. A process running many gateways (the
    fleet simulator, :class:`sim_devices.schedule.Ticker`) calls all their ticks from one
    timer instead of a thousand sleeping loops; the tick itself is the same code.
    """

    def every(self, period: float, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` every ``period`` seconds; the returned function stops it."""
        ...


@dataclass
class GatewayStats:
    """Counters for tests, logs and the status heartbeat."""

    frames: int = 0
    decodes: int = 0  # code texts found in frames (before debouncing)
    decode_errors: int = 0
    frames_unchanged: int = 0  # identical to the previous code-less frame: not decoded
    scans: int = 0  # debounced codes handed to the lane
    events_published: int = 0
    publish_failures: int = 0
    events_replayed: int = 0
    commands_received: int = 0
    commands_executed: int = 0
    commands_refused: int = 0
    # Redelivered command ids: answered again as the first time, not executed again.
    commands_repeated: int = 0
    acks: int = 0
    offline_decisions: int = 0
    # The service answered an event late, differently from the lane's offline decision.
    late_disagreements: int = 0
    denylist_updates: int = 0
    malformed_messages: int = 0
    unexpected_messages: int = 0
    handler_errors: int = 0
    camera_errors: int = 0
    hardware_errors: int = 0
    last_decode_ms: float | None = None
    fps: float | None = None
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoggingDisplay:
    """A Display that writes what the driver would read to the log (a headless lane)."""

    def __init__(self) -> None:
        self.text = ""

    def show(self, text: str) -> None:
        self.text = text
        log.info("display: %s", text)


class FileDisplay(LoggingDisplay):
    """Writes the current text to a file (replaced atomically) for a display program to show.

    A kiosk browser, an LCD driver or ``watch cat`` reads ``path``; the text is also logged.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def show(self, text: str) -> None:
        super().show(text)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


class Gateway:
    """One running lane controller. Build it with :func:`build_gateway`."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        hardware: Hardware,
        transport: Transport,
        clock: Clock,
        outbox: Outbox,
        lane: Lane,
        debouncer: Debouncer,
        tuning: Tuning,
        ticks: TickSource | None = None,
    ) -> None:
        self.settings = settings
        self.hardware = hardware
        self.clock = clock
        self.outbox = outbox
        self.lane = lane
        self.verifier = lane.verifier
        self.debouncer = debouncer
        self.tuning = tuning
        self._ticks = ticks
        self._stats = GatewayStats()
        self.uplink = Uplink(
            transport,
            lot_id=settings.lot_id,
            gate_id=settings.gate_id,
            birth_status=lambda: self.status(GatewayState.ONLINE),
        )
        self.started = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._present: bool | None = None
        self._last_frame_at: float | None = None
        self._failure_logged: dict[str, float] = {}
        self._unsent_replies: dict[str, CommandReply] = {}
        self._unsaved_offline: dict[str, OfflineDecision] = {}
        self._disputed: set[str] = set()

    @property
    def stats(self) -> GatewayStats:
        """Live counters (the uplink's decode failures included)."""
        self._stats.malformed_messages = self.uplink.malformed.total()
        self._stats.unexpected_messages = self.uplink.unexpected
        return self._stats

    @property
    def boot(self) -> int:
        return self.outbox.boot

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until :meth:`stop`; survives camera errors, bad messages and broker outages."""
        self._stopping.clear()
        self._apply([Show(IDLE_TEXT)])
        self._take_over_barrier()
        await self.uplink.start()
        loops = [
            self._scan_loop(),
            self._inbound_loop(),
            self._replay_loop(),
            self._resend_loop(),
            self._heartbeat_loop(),
        ]
        stop_ticks: Callable[[], None] | None = None
        if self._ticks is None:
            loops.insert(2, self._tick_loop())
        tasks = [asyncio.create_task(loop) for loop in loops]
        if self._ticks is not None:
            self.tick()  # at once, as the first round of a loop of its own
            stop_ticks = self._ticks.every(self.tuning.tick_s, self.tick)
        self.started.set()
        log.info(
            "gateway %s/%s (%s) started, boot %d",
            self.settings.lot_id,
            self.settings.gate_id,
            self.settings.direction.value,
            self.boot,
        )
        try:
            await self._stopping.wait()
        finally:
            if stop_ticks is not None:
                stop_ticks()
            for task in [*tasks, *self._tasks]:
                task.cancel()
            await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
            self._tasks.clear()
            with contextlib.suppress(Exception):
                await self.uplink.close(self.status(GatewayState.OFFLINE))
            self.started.clear()
            log.info("gateway stopped")

    def _take_over_barrier(self) -> None:
        """A barrier left up by an earlier run (a crash, a power loss) is not left open for
        the next cars: the lane closes it once no vehicle is detected."""
        try:
            found_open = bool(self.hardware.gate.is_open)
        except Exception as exc:
            self._stats.hardware_errors += 1
            self._stats.last_error = f"gate: {exc}"
            return
        if not found_open:
            return
        presence = self.hardware.presence
        if presence is not None:
            try:
                self._present = bool(presence.vehicle_present)
            except Exception:
                self._present = True  # unknown: assume a vehicle, so the barrier stays put
            self.feed(PresenceChanged(self._present))
        log.warning("barrier found open at start: closing it once the lane is clear")
        self.feed(BarrierFound())

    def stop(self) -> None:
        """Ask :meth:`run` to finish (safe from a signal handler on the loop)."""
        self._stopping.set()

    def close(self) -> None:
        """Release the outbox and the devices after :meth:`run` has returned."""
        self.outbox.close()
        self.hardware.close()

    # -- status ----------------------------------------------------------------------------------
    def status(self, state: GatewayState = GatewayState.ONLINE) -> GatewayStatus:
        last_error = self._stats.last_error
        return GatewayStatus(
            status_id=new_id(),
            lot_id=self.settings.lot_id,
            gate_id=self.settings.gate_id,
            state=state,
            direction=self.settings.direction,
            firmware_version=self.settings.firmware_version,
            boot=self.boot,
            sent_at=self.clock.now(),
            queue_depth=self.outbox.depth,
            camera_fps=None if self._stats.fps is None else round(self._stats.fps, 2),
            last_decode_ms=(
                None if self._stats.last_decode_ms is None else round(self._stats.last_decode_ms, 2)
            ),
            last_error=None if last_error is None else last_error[:200],
        )

    async def publish_status(self) -> bool:
        return await self.uplink.publish_status(self.status())

    # -- feeding the lane --------------------------------------------------------------------------
    def feed(self, event: LaneInput) -> list[Action]:
        """Hand one input to the lane at ``clock.now()`` and carry out its actions."""
        actions = self.lane.handle(event, self.clock.now())
        if isinstance(event, CommandReceived):
            self._count_command(event.command, actions)
        self._apply(actions)
        return actions

    def _count_command(self, command: GateCommand, actions: list[Action]) -> None:
        reply = next(
            (a for a in actions if isinstance(a, SendReply) and a.command_id == command.command_id),
            None,
        )
        if reply is not None and reply.repeat:
            self._stats.commands_repeated += 1
            log.info("command %s again: answered %s again", command.command_id, reply.outcome.value)
        elif reply is not None and reply.outcome in (
            CommandOutcome.REJECTED,
            CommandOutcome.EXPIRED,
        ):
            self._stats.commands_refused += 1
            log.info("refused command %s: %s", command.command_id, reply.detail)
        else:
            self._stats.commands_executed += 1
            log.info(
                "command %s: %s (%s)",
                command.command_id,
                command.action.value,
                command.reason.value,
                extra={
                    "event_id": command.event_id,
                    "action": command.action.value,
                    "reason": command.reason.value,
                },
            )

    def _apply(self, actions: list[Action]) -> None:
        # Write-ahead: a command's answer and a used-up code are on disk before the barrier
        # moves, so a redelivery after a crash or restart is answered the same and never
        # acts twice, and a screenshot of the code is still refused after a reboot.
        for action in actions:
            if isinstance(action, SendReply) and not action.repeat:
                self._save_answer(action)
            elif isinstance(action, SpendCode):
                self._save_spent(action)
        for action in actions:
            match action:
                case PublishEvent():
                    event = self.outbox.add(functools.partial(self._event, action))
                    self._spawn(self._publish_new(event))
                case RecordOffline(event_id, decision):
                    self._stats.offline_decisions += 1
                    # Written now; if the disk refuses, kept in memory, attached to the
                    # event's replays and written at the next round. The barrier still
                    # does what was decided, and the service must learn what it did.
                    self._unsaved_offline[event_id] = decision
                    self._save_unsaved_offline()
                    log.info(
                        "offline decision for %s: %s (%s)",
                        event_id,
                        decision.action.value,
                        decision.reason.value,
                        extra={
                            "event_id": event_id,
                            "action": decision.action.value,
                            "reason": decision.reason.value,
                        },
                    )
                case OpenGate():
                    self._device("gate.open", self.hardware.gate.open)
                case CloseGate():
                    self._device("gate.close", self.hardware.gate.close)
                case Show(text):
                    self._device(
                        "display.show", functools.partial(self.hardware.display.show, text)
                    )
                case Signal(feedback):
                    indicator = self.hardware.indicator
                    if indicator is not None:
                        self._device(
                            "indicator.signal", functools.partial(indicator.signal, feedback.value)
                        )
                case StartTimer():
                    pass  # the tick loop checks the lane's deadlines
                case SpendCode():
                    pass  # saved above, ahead of everything else
                case SendReply():
                    self._spawn(self._reply(action))

    def _save_answer(self, reply: SendReply) -> None:
        try:
            self.outbox.save_command_answer(
                reply.command_id, reply.outcome, reply.detail, keep=self.lane.command_memory
            )
        except Exception as exc:  # the disk: the lane still remembers it until a restart
            self._stats.last_error = f"outbox: {exc}"
            log.exception("saving the answer to command %s failed", reply.command_id)

    def _save_spent(self, action: SpendCode) -> None:
        try:
            self.outbox.save_spent_nonce(
                SpentNonce(action.nonce, action.expires_at),
                now=self.clock.now(),
                keep=self.settings.nonce_cache_size,
            )
        except Exception as exc:  # the disk: the verifier still remembers it until a restart
            self._stats.last_error = f"outbox: {exc}"
            log.exception("saving a used code failed")

    def _event(self, action: PublishEvent, seq: int, boot: int) -> ScanEvent:
        return ScanEvent(
            event_id=action.event_id,
            lot_id=self.settings.lot_id,
            gate_id=self.settings.gate_id,
            seq=seq,
            boot=boot,
            direction=self.settings.direction,
            code=action.code,
            scanned_at=action.scanned_at,
        )

    def _device(self, what: str, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as exc:
            self._stats.hardware_errors += 1
            self._stats.last_error = f"{what}: {exc}"
            log.exception("%s failed", what)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_new(self, event: ScanEvent) -> None:
        if await self.uplink.publish_event(event):
            self._stats.events_published += 1
            self.outbox.mark_published(event.event_id)
            log.info(
                "event %s published (seq %d)",
                event.event_id,
                event.seq,
                extra={"event_id": event.event_id, "seq": event.seq},
            )
            return
        # No answer can come while the link is down: decide now instead of making the
        # driver wait for the timeout. The event stays in the outbox for the replay.
        self._stats.publish_failures += 1
        self.feed(DecisionTimeout(event.event_id))

    async def _reply(self, action: SendReply) -> None:
        reply = CommandReply(
            reply_id=new_id(),
            command_id=action.command_id,
            lot_id=self.settings.lot_id,
            gate_id=self.settings.gate_id,
            outcome=action.outcome,
            detail=action.detail,
            at=self.clock.now(),
        )
        await self._send_reply(reply)

    async def _send_reply(self, reply: CommandReply) -> None:
        if await self.uplink.publish_reply(reply):
            self._unsent_replies.pop(reply.command_id, None)
            return
        # Kept (the same reply id) and sent again once connected: an "expired" is what
        # makes the service undo an entry or exit the barrier never moved for. Lost, the
        # driver would stay "already parked" with no stay behind it.
        log.info("reply to %s not sent (offline); sent again on reconnect", reply.command_id)
        self._unsent_replies[reply.command_id] = reply
        while len(self._unsent_replies) > self.lane.command_memory:
            self._unsent_replies.pop(next(iter(self._unsent_replies)))

    async def resend_replies(self) -> int:
        """Publish the replies that could not be sent, oldest first; stop at a failure
        (never raises: the event replay after it must go on)."""
        sent = 0
        try:
            for reply in list(self._unsent_replies.values()):
                if not await self.uplink.publish_reply(reply):
                    break
                self._unsent_replies.pop(reply.command_id, None)
                sent += 1
        except Exception as exc:
            self._failed("sending replies again", exc)
        if sent:
            log.info("sent %d replies again", sent)
        return sent

    # -- loops -------------------------------------------------------------------------------
    async def _scan_loop(self) -> None:
        camera, decoder = self.hardware.camera, self.hardware.decoder
        read: Callable[[], Coroutine[Any, Any, Frame | None]]
        if isinstance(camera, AsyncCamera):
            read = camera.read_async
        else:
            read = functools.partial(asyncio.to_thread, camera.read)
        skip_unchanged = self.settings.decode.skip_unchanged
        last_frame: Frame | None = None
        last_found = False
        backoff = self.tuning.camera_backoff_initial_s
        while True:
            try:
                frame = await read()
            except CameraError as exc:
                self._stats.camera_errors += 1
                self._stats.last_error = f"camera: {exc}"
                log.warning("camera error (retry in %.1fs): %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(self.tuning.camera_backoff_max_s, backoff * 2)
                continue
            backoff = self.tuning.camera_backoff_initial_s
            if frame is None:
                await asyncio.sleep(self.tuning.idle_sleep_s)
                continue
            self._count_frame()
            if skip_unchanged and frame is last_frame and not last_found:
                # The camera handed back the very frame that held no code: nothing new.
                # (The read itself waited for that frame: no extra yield to the loop.)
                self._stats.frames_unchanged += 1
                continue
            texts = await self._decode(decoder, frame)
            last_frame, last_found = frame, bool(texts)
            for text in texts:
                if self.debouncer.accept(text, self.clock.now()):
                    self._stats.scans += 1
                    try:
                        self.feed(CodeDecoded(text))
                    except Exception as exc:
                        self._failed("handling a scan", exc)

    async def _decode(self, decoder: Decoder, frame: Frame) -> list[str]:
        started = time.perf_counter()
        try:
            texts = await asyncio.to_thread(decoder.decode, frame)
        except Exception as exc:
            self._stats.decode_errors += 1
            self._stats.last_error = f"decoder: {exc}"
            log.exception("decoder %s failed", getattr(decoder, "name", "?"))
            return []
        self._stats.last_decode_ms = (time.perf_counter() - started) * 1000
        self._stats.decodes += len(texts)
        return texts

    def _count_frame(self) -> None:
        self._stats.frames += 1
        now = time.monotonic()
        if self._last_frame_at is not None and now > self._last_frame_at:
            instant = 1.0 / (now - self._last_frame_at)
            fps = self._stats.fps
            self._stats.fps = instant if fps is None else 0.9 * fps + 0.1 * instant
        self._last_frame_at = now

    async def _inbound_loop(self) -> None:
        async for message in self.uplink.inbound():
            try:
                self.on_message(message)
            except Exception:
                self._stats.handler_errors += 1
                log.exception("handling %s failed", type(message).__name__)
        # messages() only ends if the transport does; stop() cancels this task.

    def on_message(self, message: Inbound) -> None:
        """Handle one decoded message addressed to this gateway."""
        match message:
            case GateCommand():
                self._stats.commands_received += 1
                pending = self._pending(message.event_id) if message.event_id else None
                unanswered = pending is not None and pending.offline is None
                decided = self._answered(message) if message.event_id is not None else None
                self.feed(CommandReceived(message, decided_offline=decided, unanswered=unanswered))
            case EventAck():
                self._stats.acks += 1
                self._disputed.discard(message.event_id)
                self._unsaved_offline.pop(message.event_id, None)
                self.outbox.remove(message.event_id)
            case DenyList():
                self._stats.denylist_updates += 1
                self.verifier.update_denylist(message.accounts)
                # Kept on disk: a gateway that restarts while offline still honours it.
                self.outbox.save_denylist(message.list_id, message.accounts)
                log.info("deny-list %s: %d accounts", message.list_id, len(message.accounts))

    def _answered(self, command: GateCommand) -> GateAction | None:
        """A command answers an event: it leaves the outbox, unless the lane already acted
        otherwise on its own (the answer came after the decision timeout). Then the service
        must learn what the barrier really did: the event is sent again with its offline
        decision (at once the first time, then by the resend loop); only an EventAck or an
        answer that agrees settles it. Returns what the lane did on its own for that event,
        if it did."""
        event_id = command.event_id
        assert event_id is not None
        pending = self._pending(event_id)
        offline = pending.offline if pending is not None else None
        decided = offline.action if offline is not None else None
        if pending is not None and offline is not None and offline.action is not command.action:
            if event_id not in self._disputed:
                self._disputed.add(event_id)
                self._stats.late_disagreements += 1
                log.warning(
                    "late answer %s for %s disagrees with the offline decision %s; resending it",
                    command.action.value,
                    event_id,
                    offline.action.value,
                    extra={"event_id": event_id, "action": offline.action.value},
                )
                self._spawn(self._resend(pending))
            else:
                # The service answers an event sent with its offline decision with an
                # EventAck: a disagreeing command again is its answer to an earlier copy
                # sent live (a redelivery). The event stays in the outbox until the service
                # has the barrier's decision; dropping it here would lose that exit or entry.
                log.info(
                    "answer %s for %s again, before the offline decision %s reached the"
                    " service; still in the outbox",
                    command.action.value,
                    event_id,
                    offline.action.value,
                    extra={"event_id": event_id},
                )
            return decided
        self._disputed.discard(event_id)
        self._unsaved_offline.pop(event_id, None)
        self.outbox.remove(event_id)
        return decided

    def _pending(self, event_id: str) -> ScanEvent | None:
        """The unanswered event from the outbox, with an offline decision the disk could
        not take attached."""
        event = self.outbox.get(event_id)
        return None if event is None else self._with_unsaved(event)

    def _with_unsaved(self, event: ScanEvent) -> ScanEvent:
        decision = self._unsaved_offline.get(event.event_id)
        if decision is None or event.offline is not None:
            return event
        return event.model_copy(update={"offline": decision})

    def _save_unsaved_offline(self) -> None:
        """Write the offline decisions not on disk yet; what the disk refuses stays kept."""
        for event_id, decision in list(self._unsaved_offline.items()):
            try:
                self.outbox.set_offline(event_id, decision)
            except Exception as exc:
                self._stats.last_error = f"outbox: {exc}"
                self._log_limited(f"recording the offline decision for {event_id}", exc)
                return  # the disk still fails: again next round
            del self._unsaved_offline[event_id]

    async def _resend(self, event: ScanEvent) -> None:
        if await self.uplink.publish_event(event):
            self.outbox.mark_published(event.event_id)
        # else: still in the outbox; the replay after the next reconnect sends it

    def tick(self) -> None:
        """Read the detector (feeding a change to the lane) and let the lane check its
        deadlines. Every ``tick_s``: from :meth:`run`'s own loop, or from the
        :class:`TickSource` the gateway was built with."""
        presence = self.hardware.presence
        if presence is not None:
            try:
                present = bool(presence.vehicle_present)
            except Exception as exc:
                self._stats.hardware_errors += 1
                self._stats.last_error = f"presence: {exc}"
                present = True  # unknown: assume a vehicle, so the barrier stays put
            if present != self._present:
                self._present = present
                self.feed(PresenceChanged(present))
        deadline = self.lane.next_deadline
        if deadline is not None and self.clock.now() >= deadline:
            self.feed(_TICK)  # earlier, a Tick does nothing (Lane.next_deadline)

    def _failed(self, what: str, exc: Exception) -> None:
        """A round of a background loop failed: counted and logged (the first time, then
        at most once a minute per kind), and the loop goes on. A loop that died here would
        leave the gateway up but deaf: no decision timeouts without the tick, no resends
        without the resend loop, no codes read without the scan loop."""
        self._stats.handler_errors += 1
        self._stats.last_error = f"{what}: {exc}"
        self._log_limited(what, exc)

    def _log_limited(self, what: str, exc: Exception) -> None:
        """Log ``what`` failed with its traceback: the first time, then once a minute."""
        kind = what.split(" for ", 1)[0]
        now = time.monotonic()
        if now - self._failure_logged.get(kind, -math.inf) >= 60:
            self._failure_logged[kind] = now
            log.error("%s failed; going on", what, exc_info=exc)

    async def _tick_loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception as exc:
                self._failed("the tick", exc)
            await asyncio.sleep(self.tuning.tick_s)

    async def _replay_loop(self) -> None:
        while True:
            await self.uplink.reconnected.wait()
            self.uplink.reconnected.clear()
            await self.resend_replies()
            try:
                await self.replay()
            except Exception as exc:
                self._failed("the replay", exc)

    async def _resend_loop(self) -> None:
        oldest: str | None = None
        while True:
            await asyncio.sleep(self.tuning.resend_s)
            if not self.uplink.connected:
                oldest = None
                continue
            await self.resend_replies()
            try:
                pending = [event.event_id for event in self.outbox.pending()]
                if resend_due(oldest, pending):
                    await self.replay()
            except Exception as exc:
                self._failed("the resend", exc)
                continue
            oldest = pending[0] if pending else None

    async def replay(self) -> int:
        """Publish every unanswered event in order; stop at the first failure."""
        self._save_unsaved_offline()
        sent = 0
        for stored in self.outbox.pending():
            if self.lane.awaiting_event_id == stored.event_id:
                continue  # just published live; its answer is on its way
            event = self._with_unsaved(stored)
            if not await self.uplink.publish_event(event):
                break
            self.outbox.mark_published(event.event_id)
            sent += 1
        self._stats.events_replayed += sent
        if sent:
            log.info("replayed %d events", sent)
        return sent

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            if self.uplink.connected:
                try:
                    await self.publish_status()
                except Exception as exc:
                    self._failed("the heartbeat", exc)


def build_gateway(
    settings: GatewaySettings,
    *,
    hardware: Hardware,
    transport: Transport,
    clock: Clock,
    outbox: Outbox | None = None,
    tuning: Tuning | None = None,
    id_factory: Callable[[], str] = new_id,
    ticks: TickSource | None = None,
) -> Gateway:
    """Wire a lane controller. Pass ``outbox`` when the transport's will needs its boot;
    ``ticks`` when something else (a fleet's shared :class:`TickSource`) is to call the
    gateway's tick instead of a loop of its own.

    Raises :class:`ConfigError` when settings and hardware do not fit together.
    """
    if settings.scan_only_when_present and hardware.presence is None:
        raise ConfigError("scan_only_when_present: needs a presence detector (gpio.presence_pin)")
    timeouts = settings.timeouts
    verifier = LocalVerifier(
        settings.verification_keys(),
        settings.direction,
        allow=settings.offline.allows(settings.direction),
        nonce_capacity=settings.nonce_cache_size,
    )
    outbox = outbox if outbox is not None else Outbox(settings.outbox_file)
    lane = Lane(
        lot_id=settings.lot_id,
        gate_id=settings.gate_id,
        verifier=verifier,
        decision_timeout=_seconds(timeouts.decision_timeout_s),
        open_hold=_seconds(timeouts.open_hold_s),
        scan_only_when_present=settings.scan_only_when_present,
        id_factory=id_factory,
        seen_commands=COMMAND_MEMORY,
        # The answers given before a restart too: a redelivered command gets the same
        # answer and is not executed again.
        known_commands=[
            CommandRecord(command_id, outcome, detail)
            for command_id, outcome, detail in outbox.load_command_answers(COMMAND_MEMORY)
        ],
    )
    # Codes used up here before a restart stay used up until they expire.
    now = clock.now()
    spent = outbox.load_spent_nonces(now)
    verifier.restore_spent(spent, now)
    if spent:
        log.info("%d used codes from the last run are still refused", len(spent))
    list_id, denied = outbox.load_denylist()
    if list_id is not None:
        verifier.update_denylist(denied)
        log.info("deny-list %s from the last run: %d accounts", list_id, len(denied))
    return Gateway(
        settings,
        hardware=hardware,
        transport=transport,
        clock=clock,
        outbox=outbox,
        lane=lane,
        debouncer=Debouncer(_seconds(timeouts.debounce_s)),
        tuning=tuning or Tuning(),
        ticks=ticks,
    )


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def camera_opener(camera: CameraSettings) -> tuple[str, Callable[[], Camera]]:
    """Which camera library the settings pick, and a function that opens that camera."""
    from gateway_firmware.hardware.camera_opencv import OpenCVCamera, Picamera2Camera

    backend = camera.backend
    if backend == "auto":
        pi_camera = camera.device in (0, "0") and importlib.util.find_spec("picamera2")
        backend = "picamera2" if pi_camera else "opencv"
    if backend == "picamera2":
        return backend, functools.partial(
            Picamera2Camera, width=camera.width, height=camera.height, fps=camera.fps
        )
    return backend, functools.partial(
        OpenCVCamera, camera.device, camera.width, camera.height, camera.fps
    )


def real_hardware(settings: GatewaySettings) -> Hardware:
    """The Pi's devices: the camera, the configured decode pipeline, gpiozero relay/lamps/buzzer
    and detector, the display.

    The camera is opened lazily and reopened after failures (:class:`ReopeningCamera`): a
    camera missing at start is reported in the status and retried; the lane still answers
    commands and the operator can open it.
    """
    from gateway_firmware.hardware.camera_opencv import ReopeningCamera
    from gateway_firmware.hardware.decoders import make_decoder
    from gateway_firmware.hardware.gpio import GpioPresence, RelayGate

    gpio = settings.gpio
    backend, opener = camera_opener(settings.camera)
    decoder = make_decoder(
        settings.decoder, roi=settings.decode.roi, downscale=settings.decode.downscale
    )
    gate = RelayGate(
        gpio.relay_pin,
        active_high=gpio.relay_active_high,
        green_led_pin=gpio.green_led_pin,
        red_led_pin=gpio.red_led_pin,
        buzzer_pin=gpio.buzzer_pin,
    )
    display = (
        FileDisplay(settings.display_file)
        if settings.display_file is not None
        else LoggingDisplay()
    )
    hardware = Hardware(
        camera=ReopeningCamera(opener, name=f"{backend}:{settings.camera.device}"),
        decoder=decoder,
        gate=gate,
        display=display,
        indicator=gate,
        on_close=[gate.release],
    )
    if gpio.presence_pin is not None:
        presence = GpioPresence(gpio.presence_pin, pull_up=gpio.presence_pull_up)
        hardware.presence = presence
        hardware.on_close.append(presence.release)
    return hardware


def tls_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The TLS context for an ``mqtts://`` broker (None for ``mqtt://``): the broker's
    certificate and host name are verified against ``tls.ca_file`` (else the system's
    trust store), and this gateway proves who it is with ``tls.cert_file``/``key_file``.

    Raises :class:`ConfigError` naming ``tls`` if a file stopped loading since start.
    """
    if not settings.broker_tls:
        return None
    tls = settings.tls
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert_file is not None and tls.key_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load the certificates: {exc}") from None
    return context


def make_transport(settings: GatewaySettings, *, boot: int, clock: Clock) -> Transport:
    """The MQTT transport with this gateway's client id, credentials (a password, a client
    certificate, or both), TLS context and last will."""
    from parking_protocol.mqtt import MqttTransport, parse_broker_url

    password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
    return MqttTransport(
        parse_broker_url(settings.broker_url),
        client_id=settings.client_id,
        will=status_will(settings, boot, now=clock.now()),
        username=settings.mqtt_username,
        password=password,
        tls_context=tls_context(settings),
        backoff_max=settings.reconnect_max_s,
        backoff_initial=min(0.2, settings.reconnect_max_s),
    )
