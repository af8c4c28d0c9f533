"""Coverage-guided fuzz targets (atheris + libFuzzer) for every decoder of outside input.

Each target feeds one input to a decoder the way its consumer does and lets only the
decoder's typed rejections through (:class:`~parking_protocol.messages.ProtocolError`,
:class:`~parking_protocol.qr_token.CodeRejected`, a counted drop at an MQTT edge). Anything
else escaping, or a property below failing, is a crash: libFuzzer writes the input to
``crash-<sha1>`` and the process exits non-zero (77 for an escaped Python exception).

========================  ==============================================================
``message``               ``messages.decode`` with and without each expected type: typed
                          rejections only, the typed and untyped answers agree, bytes and
                          text agree, a decoded message re-encodes to itself and its
                          timestamps convert to UTC (what every consumer does with them)
``code``                  ``qr_token.parse_code`` / ``verify_code`` on raw text (mutated
                          seed codes): only ``CodeRejected``, and nothing but a code we
                          signed, byte for byte, is ever accepted
``signed_code``           codes signed from fuzzed claims (any kid, account, times, nonce,
                          signer), maybe mutated: ``verify_code`` gives exactly the answer
                          a separate model of the rules gives
``service_edge``          the central service's ``Bridge.accept`` (topic + payload; no
                          database is touched): a typed message or exactly one counted drop
``gateway_edge``          a gateway's ``Uplink.accept``: the same on the gateway's side
========================  ==============================================================

Run one by hand for a long session; libFuzzer's flags pass through, and the valid seeds and
a dictionary of the wire vocabulary are added unless given::

    .venv/bin/python tests/reliability/fuzz_targets.py message -max_total_time=600
    .venv/bin/python tests/reliability/fuzz_targets.py code -atheris_runs=1000000 corpus/
    .venv/bin/python tests/reliability/fuzz_targets.py --list

A corpus directory given on the command line (by default ``$TMPDIR/qrpark-fuzz/TARGET``)
gets the seeds if it is empty, and keeps what libFuzzer finds. ``_selftest_broken`` is a
deliberately broken consumer (it logs the payload as UTF-8 text before decoding): it must
crash, which shows the harness can fail.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = ["SELFTEST", "TARGETS", "Target", "main"]

# What coverage is collected for (atheris instruments these as they are imported).
SERVER = ("server.gateways.sequence", "server.mqtt.bridge")
GATEWAY = ("gateway_firmware.uplink.link",)
INSTRUMENTED = ["parking_protocol", *SERVER, *GATEWAY]
SELFTEST = "_selftest_broken"
NOW = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
LOT, GATE = "p1", "in1"
# The datetime range: Unix seconds datetime can hold (0001-01-01 .. 9999-12-31 23:59:59).
_MIN_TS, _MAX_TS = -62135596800, 253402300799


def _atheris() -> Any:
    """atheris, imported late: the module is importable (``TARGETS``) without it."""
    import atheris  # type: ignore[import-untyped]

    return atheris


def _timestamps(value: Any) -> Iterator[datetime]:
    if isinstance(value, datetime):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _timestamps(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _timestamps(item)
    elif hasattr(value, "__pydantic_fields__"):
        for name in value.__pydantic_fields__:
            yield from _timestamps(getattr(value, name))


# --------------------------------------------------------------------------------------
# MQTT payloads


def _valid_messages() -> list[Any]:
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
    )
    from parking_protocol.types import Direction, GateAction, Money, Reason

    ids = iter(f"id-{n:08d}" for n in range(100))
    code = "QP1.k1.alice.1767254400.1767254460.AAAAAAAAAAAAAAAA." + "A" * 86
    return [
        ScanEvent(
            event_id=next(ids),
            lot_id=LOT,
            gate_id=GATE,
            seq=7,
            boot=2,
            direction=Direction.ENTRY,
            code=code,
            scanned_at=NOW,
            offline=OfflineDecision(action=GateAction.OPEN, reason=Reason.WELCOME, decided_at=NOW),
        ),
        GateCommand(
            command_id=next(ids),
            event_id=next(ids),
            lot_id=LOT,
            gate_id=GATE,
            action=GateAction.DENY,
            reason=Reason.INSUFFICIENT_BALANCE,
            display="Insufficient balance",
            amount=Money(amount_minor=1250, currency="EUR"),
            session_id="s1",
            issued_at=NOW,
            deadline=NOW + timedelta(seconds=10),
        ),
        EventAck(
            event_id=next(ids),
            lot_id=LOT,
            gate_id=GATE,
            result=Reason.PAID,
            amount=Money(amount_minor=500),
            session_id="s2",
        ),
        CommandReply(
            reply_id=next(ids),
            command_id=next(ids),
            lot_id=LOT,
            gate_id=GATE,
            outcome=CommandOutcome.DONE,
            detail="opened",
            at=NOW,
        ),
        GatewayStatus(
            status_id=next(ids),
            lot_id=LOT,
            gate_id=GATE,
            state=GatewayState.ONLINE,
            direction=Direction.ENTRY,
            firmware_version="1.0",
            boot=3,
            sent_at=NOW,
            queue_depth=4,
            camera_fps=14.5,
            last_decode_ms=3.25,
            last_error="none",
        ),
        DenyList(list_id=next(ids), lot_id=LOT, accounts=("mallory", "eve"), issued_at=NOW),
    ]


def _message_seeds() -> list[bytes]:
    from parking_protocol.messages import encode

    return [encode(message) for message in _valid_messages()]


def _message_dictionary() -> list[bytes]:
    from parking_protocol.messages import message_json_schema

    words: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "properties" and isinstance(value, dict):
                    words.update(json.dumps(name) for name in value)
                if key in ("const", "enum"):
                    for item in value if isinstance(value, list) else [value]:
                        words.add(json.dumps(item))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(message_json_schema())
    words.update(
        [
            "null", "true", "false", "-0", "1e308", "1e999", "-1", "Infinity", "NaN",
            "18446744073709551616", '"2026-01-01T00:00:00Z"', '"0001-01-01T00:00:00+01:00"',
            '"9999-12-31T23:59:59-01:00"', "+23:59", "-23:59", ".999999999", "\\u0000",
            '"v"', "1", "2", "{}", "[]",
        ]
    )  # fmt: skip
    return sorted(word.encode() for word in words)


def _interesting_values() -> list[Any]:
    from parking_protocol.messages import message_json_schema

    values: list[Any] = [
        None, True, False, 0, -1, 1, 2, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 0.5, -0.0,
        1e308, float("inf"), float("-inf"), float("nan"), "", " ", "x" * 201, "x" * 1025,
        "a.b", "é", "\u0000", "2026-01-01T08:00:00Z", "2026-01-01T08:00:00", "2026-01-01",
        "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-01-01T08:00:00+23:59",
        "1767254400", 1767254400, 1e20, "QP1.k1.alice.1.2.AA.AA", [], {}, [1], {"": None},
    ]  # fmt: skip

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("const", "enum"):
                    values.extend(value if isinstance(value, list) else [value])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(message_json_schema())
    return values


def _json_mutator(keep: int) -> Callable[[bytes, int, int], bytes]:
    """libFuzzer mutates bytes; a JSON payload needs a field changed and still be JSON.

    Changes one node of the document (an interesting value, another field's value, a key
    removed or added, a string or number mutated by libFuzzer), or, one time in five, the
    raw bytes. The first ``keep`` bytes (an edge target's topic selector) stay apart.
    """
    import random

    atheris = _atheris()

    pool = _interesting_values()
    names = sorted(
        {json.loads(word) for word in _message_dictionary() if word.startswith(b'"')}, key=str
    )

    def nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        yield path
        if isinstance(value, dict):
            for key, item in value.items():
                yield from nodes(item, (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from nodes(item, (*path, index))

    def replace(document: Any, path: tuple[Any, ...], new: Any) -> Any:
        if not path:
            return new
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = new
        return document

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        head, body = data[:keep], data[keep:]
        if keep and rng.random() < 0.1:
            head = bytes([rng.randrange(256)])
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            document = None
        if document is None or rng.random() < 0.2:
            mutated: bytes = atheris.Mutate(body, max(1, max_size - keep))
            return head + mutated
        paths = list(nodes(document))
        path = rng.choice(paths)
        target: Any = document
        for step in path:
            target = target[step]
        choice = rng.random()
        if choice < 0.45:
            new = rng.choice(pool)
        elif choice < 0.6:
            other: Any = document
            for step in rng.choice(paths):
                other = other[step]
            new = json.loads(json.dumps(other))
        elif choice < 0.75 and isinstance(target, dict):
            if target and rng.random() < 0.5:
                target.pop(rng.choice(sorted(target, key=str)))
            else:
                target[rng.choice(names)] = rng.choice(pool)
            new = target
        elif isinstance(target, str):
            raw = atheris.Mutate(target.encode(), 2 * len(target) + 8)
            new = raw.decode("utf-8", errors="replace")
        elif isinstance(target, int | float) and not isinstance(target, bool):
            new = type(target)(json.loads(atheris.Mutate(str(target).encode(), 32) or b"0"))
        else:
            new = rng.choice(pool)
        try:
            out = json.dumps(replace(document, path, new), allow_nan=True).encode()
        except (ValueError, TypeError):
            out = body
        return head + out[: max(0, max_size - keep)]

    def guarded(data: bytes, max_size: int, seed: int) -> bytes:
        try:
            return mutate(data, max_size, seed)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError):
            return data  # the mutator's own trouble with an odd document: try again later

    return guarded


def _message_target() -> Callable[[bytes], None]:
    from parking_protocol.messages import (
        MAX_PAYLOAD_BYTES,
        CommandReply,
        DecodeFailure,
        DenyList,
        EventAck,
        GateCommand,
        GatewayStatus,
        ProtocolError,
        ScanEvent,
        decode,
        encode,
    )

    kinds = (ScanEvent, GateCommand, EventAck, CommandReply, GatewayStatus, DenyList)

    def outcome(payload: bytes | str, kind: type[Any] | None = None) -> Any:
        """The message, or the failure of the typed rejection."""
        try:
            return decode(payload) if kind is None else decode(payload, kind)
        except ProtocolError as exc:
            failure = exc.failure
        assert isinstance(failure, DecodeFailure)
        return failure

    def one(data: bytes) -> None:
        message = outcome(data)
        assert message is not DecodeFailure.WRONG_TYPE
        decoded = not isinstance(message, DecodeFailure)
        for kind in kinds:
            typed = outcome(data, kind)
            if not decoded:
                assert typed is message, (kind, typed, message)
            elif isinstance(message, kind):
                assert type(typed) is kind and typed == message
            else:
                assert typed is DecodeFailure.WRONG_TYPE, (kind, typed)
        if len(data) <= MAX_PAYLOAD_BYTES:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                assert outcome(text) == message, "bytes and text decode differently"
        if decoded:
            wire = encode(message)
            assert decode(wire) == message, f"does not re-encode to itself: {wire!r}"
            for stamp in _timestamps(message):
                stamp.astimezone(UTC)  # an OverflowError here is a finding

    return one


# --------------------------------------------------------------------------------------
# QR codes

_KEYS: dict[str, Any] = {}


def _signing_keys() -> dict[str, Any]:
    """Two fixed Ed25519 keys (k1, k2): the same codes every run."""
    if not _KEYS:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        for kid, fill in (("k1", 1), ("k2", 2)):
            _KEYS[kid] = Ed25519PrivateKey.from_private_bytes(bytes([fill]) * 32)
    return _KEYS


def _code_seeds() -> list[bytes]:
    from parking_protocol.qr_token import issue_code

    keys = _signing_keys()
    codes = [
        issue_code(keys["k1"], kid="k1", account_id="alice", now=NOW, nonce=bytes(12)),
        issue_code(
            keys["k2"], kid="k2", account_id="b" * 36, now=NOW - timedelta(seconds=30), nonce=b"n"
        ),
        issue_code(
            keys["k1"],
            kid="k1",
            account_id="carol_1-2",
            now=NOW,
            lifetime=timedelta(minutes=10),
            nonce=bytes(range(16)),
        ),
        # a kid nobody holds
        issue_code(keys["k1"], kid="k3", account_id="dave", now=NOW, nonce=b"\xff" * 12),
    ]
    return [code.encode() for code in codes] + [b"QP2.k1.alice.1.2.AA.AA", b" QP1. "]


def _code_target() -> Callable[[bytes], None]:
    from parking_protocol.qr_token import CodeRejected, parse_code, verify_code

    public = {kid: key.public_key() for kid, key in _signing_keys().items()}
    signed = {seed.decode() for seed in _code_seeds()}

    def one(data: bytes) -> None:
        text = data.decode("utf-8", errors="replace")
        try:
            parse_code(text)
        except CodeRejected:
            pass
        try:
            claims = verify_code(text, public, now=NOW + timedelta(seconds=10))
        except CodeRejected:
            return
        assert text.strip() in signed, f"accepted a code nobody signed: {text!r}"
        assert claims.signed_part.decode() + "." in text

    return one


def _signed_code_target() -> Callable[[bytes], None]:
    atheris = _atheris()

    from parking_protocol.qr_token import (
        DEFAULT_SKEW,
        MAX_LIFETIME,
        CodeRejected,
        verify_code,
    )
    from parking_protocol.types import CodeRejection

    keys = _signing_keys()
    public = {kid: key.public_key() for kid, key in keys.items()}
    ids = ["alice", "k1", "k2", "b" * 36, "b" * 37, "", "a.b", "x y", "é", "Z_9-"]

    def b64(raw: bytes) -> str:
        import base64

        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def expected(
        kid: str, account: str, iat: int, exp: int, nonce: str, signer: str, now_ts: int
    ) -> CodeRejection | None:
        """The rules of a code, written out again independently of qr_token."""
        import re

        ident = re.compile(r"[A-Za-z0-9_-]{1,36}")
        if not (ident.fullmatch(kid) and ident.fullmatch(account)):
            return CodeRejection.MALFORMED
        if not (0 <= iat <= _MAX_TS and 0 <= exp <= _MAX_TS and len(str(iat)) <= 12):
            return CodeRejection.MALFORMED
        if len(str(exp)) > 12 or not re.fullmatch(r"[A-Za-z0-9_-]+", nonce):
            return CodeRejection.MALFORMED
        if kid not in public:
            return CodeRejection.UNKNOWN_KEY
        if signer != kid:
            return CodeRejection.BAD_SIGNATURE
        if exp <= iat or exp - iat > MAX_LIFETIME.total_seconds():
            return CodeRejection.MALFORMED
        skew = DEFAULT_SKEW.total_seconds()
        if now_ts + skew < iat:
            return CodeRejection.NOT_YET_VALID
        if now_ts - skew >= exp:
            return CodeRejection.EXPIRED
        return None

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        kid = ids[fdp.ConsumeIntInRange(0, len(ids) - 1)] if fdp.ConsumeBool() else "k1"
        account = ids[fdp.ConsumeIntInRange(0, len(ids) - 1)] if fdp.ConsumeBool() else "alice"
        base = int(NOW.timestamp())
        if fdp.ConsumeBool():
            iat = fdp.ConsumeIntInRange(0, 10**12 - 1)
            exp = fdp.ConsumeIntInRange(0, 10**12 - 1)
        else:
            iat = base + fdp.ConsumeIntInRange(-900, 900)
            exp = iat + fdp.ConsumeIntInRange(-5, 700)
        nonce = b64(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16)))
        signer = "k2" if fdp.ConsumeIntInRange(0, 7) == 0 else kid if kid in keys else "k1"
        now_ts = base + fdp.ConsumeIntInRange(-1200, 1200)
        body = f"QP1.{kid}.{account}.{iat}.{exp}.{nonce}"
        code = f"{body}.{b64(keys[signer].sign(body.encode()))}"
        mutated = code
        if fdp.ConsumeBool():
            where = fdp.ConsumeIntInRange(0, len(code) - 1)
            mutated = code[:where] + fdp.ConsumeUnicodeNoSurrogates(2) + code[where + 1 :]
        now = datetime.fromtimestamp(now_ts, UTC)
        try:
            claims = verify_code(mutated, public, now=now)
        except CodeRejected as exc:
            got: CodeRejection | None = exc.reason
        else:
            got = None
            assert claims.account_id == account and claims.kid == kid
            assert claims.issued_at == datetime.fromtimestamp(iat, UTC)
            assert claims.expires_at == datetime.fromtimestamp(exp, UTC)
        if mutated.strip() == code:
            want = expected(kid, account, iat, exp, nonce, signer, now_ts)
            assert got == want, f"{code!r} at {now_ts}: got {got}, the rules say {want}"
        else:
            assert got is not None, f"a mutated code was accepted: {code!r} -> {mutated!r}"

    return one


# --------------------------------------------------------------------------------------
# The MQTT edges: topic + payload


def _edge_topics() -> list[str]:
    from parking_protocol.topics import TopicKind, denylist_topic, gate_topic

    kinds = [kind for kind in TopicKind if kind is not TopicKind.DENYLIST]
    topics = [gate_topic(LOT, gate, kind) for gate in (GATE, "out1") for kind in kinds]
    return [*topics, denylist_topic(LOT), denylist_topic("p2"), "qrpark/v2/lots/p1/denylist", ""]


def _split(data: bytes, topics: list[str]) -> tuple[str, bytes]:
    """Byte 0 picks a known topic; past the list, the topic is the text up to a NUL."""
    if not data:
        return "", b""
    if data[0] < len(topics):
        return topics[data[0]], data[1:]
    topic, _, payload = data[1:].partition(b"\x00")
    return topic.decode("utf-8", errors="replace"), payload


def _edge_seeds() -> list[bytes]:
    count = len(_edge_topics())
    seeds = [bytes([index]) + payload for payload in _message_seeds() for index in range(count)]
    seeds.append(bytes([255]) + b"qrpark/v1/lots/p1/gates/in1/events\x00{}")
    return seeds


def _check_topic(topic: str) -> None:
    from parking_protocol.topics import TopicKind, denylist_topic, gate_topic, parse_topic

    ref = parse_topic(topic)
    if ref is None:
        return
    if ref.kind is TopicKind.DENYLIST:
        rebuilt = denylist_topic(ref.lot_id)
    else:
        assert ref.gate_id is not None
        rebuilt = gate_topic(ref.lot_id, ref.gate_id, ref.kind)
    assert topic == rebuilt, f"{topic!r} parsed as {ref}"


def _service_edge_target() -> Callable[[bytes], None]:
    import sqlalchemy as sa

    from parking_protocol.clock import FakeClock
    from parking_protocol.messages import CommandReply, GatewayStatus, ScanEvent, decode
    from parking_protocol.topics import TopicKind, parse_topic
    from parking_protocol.transport import InboundMessage, InMemoryBroker
    from server.mqtt.bridge import Bridge
    from server.sessions.flows import FlowConfig

    # accept() decodes only: the engine is never connected to.
    bridge = Bridge(
        InMemoryBroker().client("central"),
        sa.create_engine("sqlite://"),
        FakeClock(NOW),
        FlowConfig(keys={}),
    )
    expected = {
        TopicKind.EVENTS: ScanEvent,
        TopicKind.STATUS: GatewayStatus,
        TopicKind.REPLIES: CommandReply,
    }
    topics = _edge_topics()

    def one(data: bytes) -> None:
        topic, payload = _split(data, topics)
        _check_topic(topic)
        stats = bridge.stats
        before = stats.bad_topics + sum(stats.decode_failures.values())
        inbound = bridge.accept(InboundMessage(topic, payload))
        after = stats.bad_topics + sum(stats.decode_failures.values())
        if inbound is None:
            assert after == before + 1, "dropped without a count"
            return
        assert after == before
        ref = parse_topic(topic)
        assert ref is not None and inbound.ref == ref
        assert type(inbound.message) is expected[ref.kind]
        assert inbound.message == decode(payload)

    return one


def _gateway_edge_target() -> Callable[[bytes], None]:
    from gateway_firmware.uplink.link import Uplink
    from parking_protocol.messages import DenyList, EventAck, GateCommand, GatewayState
    from parking_protocol.messages import GatewayStatus as Status
    from parking_protocol.topics import TopicKind, parse_topic
    from parking_protocol.transport import InMemoryBroker

    def birth() -> Status:
        return Status(
            status_id="birth-0001", lot_id=LOT, gate_id=GATE, state=GatewayState.ONLINE, sent_at=NOW
        )

    link = Uplink(InMemoryBroker().client("gw"), lot_id=LOT, gate_id=GATE, birth_status=birth)
    topics = _edge_topics()

    def one(data: bytes) -> None:
        topic, payload = _split(data, topics)
        _check_topic(topic)
        before = link.unexpected + sum(link.malformed.values())
        message = link.accept(topic, payload)
        after = link.unexpected + sum(link.malformed.values())
        if message is None:
            assert after == before + 1, "dropped without a count"
            return
        assert after == before
        ref = parse_topic(topic)
        assert ref is not None and ref.lot_id == LOT
        if isinstance(message, DenyList):
            assert ref.kind is TopicKind.DENYLIST and message.lot_id == LOT
        else:
            assert isinstance(message, GateCommand | EventAck)
            assert ref.kind is TopicKind.COMMANDS and ref.gate_id == GATE == message.gate_id

    return one


def _broken_target() -> Callable[[bytes], None]:
    """A consumer with a real-looking bug: it logs the payload as UTF-8 before decoding."""
    from parking_protocol.messages import ProtocolError, decode

    log = logging.getLogger("fuzz.selftest")

    def one(data: bytes) -> None:
        log.debug("payload %s", data.decode("utf-8"))  # UnicodeDecodeError escapes
        try:
            decode(data)
        except ProtocolError:
            pass

    return one


# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    build: Callable[[], Callable[[bytes], None]]
    seeds: Callable[[], list[bytes]]
    dictionary: Callable[[], list[bytes]] = list
    modules: tuple[str, ...] = ("parking_protocol",)
    """Imported (instrumented) before ``build``: only what the target needs starts fast."""
    json_prefix: int | None = None
    """Inputs are ``json_prefix`` bytes and a JSON document: mutate them as such."""


def _code_words() -> list[bytes]:
    return [b"QP1", b"QP2", b"k1", b"k2", b".", b"=", b"alice", b"1767254400", b" ", b"\n"]


def _edge_dictionary() -> list[bytes]:
    return [*_message_dictionary(), b"qrpark/v1/lots/", b"/gates/", b"/events", b"\x00"]


TARGETS: dict[str, Target] = {
    "message": Target(_message_target, _message_seeds, _message_dictionary, json_prefix=0),
    "code": Target(_code_target, _code_seeds, _code_words),
    "signed_code": Target(_signed_code_target, lambda: [bytes(range(64))]),
    "service_edge": Target(
        _service_edge_target,
        _edge_seeds,
        _edge_dictionary,
        ("parking_protocol", *SERVER),
        json_prefix=1,
    ),
    "gateway_edge": Target(
        _gateway_edge_target,
        _edge_seeds,
        _edge_dictionary,
        ("parking_protocol", *GATEWAY),
        json_prefix=1,
    ),
    SELFTEST: Target(_broken_target, _message_seeds),
}


def _dictionary_line(word: bytes) -> str:
    """One libFuzzer dictionary entry: the word quoted, other than printable ASCII as \\xNN."""
    plain = (chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in word)
    return '"' + "".join(plain) + '"'


def main(argv: list[str]) -> None:
    """``fuzz_targets.py TARGET [libFuzzer flags] [CORPUS_DIR ...]`` (exits; libFuzzer's)."""
    if len(argv) < 2 or argv[1] not in TARGETS:
        names = ", ".join(name for name in TARGETS if name != SELFTEST)
        print(f"usage: {argv[0]} TARGET [libFuzzer flags] [corpus dirs]\ntargets: {names}")
        raise SystemExit(0 if argv[1:] == ["--list"] else 2)
    atheris = _atheris()

    name, rest = argv[1], argv[2:]
    target = TARGETS[name]
    logging.disable(logging.CRITICAL)  # every drop is logged; libFuzzer's output is enough
    atheris.enabled_hooks.add("str")
    with atheris.instrument_imports(include=INSTRUMENTED):
        for module in target.modules:
            importlib.import_module(module)
    one = target.build()
    work = Path(tempfile.gettempdir()) / "qrpark-fuzz"  # reused: runs go on from its corpus
    work.mkdir(exist_ok=True)
    corpora = [arg for arg in rest if not arg.startswith("-")]
    if not corpora:
        rest.append(str(work / name))
        corpora = rest[-1:]
    seed_dir = Path(corpora[0])
    seed_dir.mkdir(parents=True, exist_ok=True)
    if not any(seed_dir.iterdir()):
        for index, seed in enumerate(target.seeds()):
            (seed_dir / f"seed-{index:03d}").write_bytes(seed)
    words = target.dictionary()
    if words and not any(arg.startswith("-dict=") for arg in rest):
        dictionary = work / f"{name}.dict"
        with tempfile.NamedTemporaryFile("w", dir=work, delete=False) as file:
            file.write("".join(_dictionary_line(word) + "\n" for word in words))
        os.replace(file.name, dictionary)  # whole, even with another run writing it too
        rest.append(f"-dict={dictionary}")
    if target.json_prefix is None:
        atheris.Setup([argv[0], *rest], one)
    else:
        atheris.Setup([argv[0], *rest], one, custom_mutator=_json_mutator(target.json_prefix))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
