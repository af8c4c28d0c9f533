"""The driver's dynamic parking code ("Suishen-style"): build, parse, verify.

A code is a compact text that fits a QR code a phone shows and a 640x480 camera reads::

    QP1.<kid>.<account>.<issued_at>.<expires_at>.<nonce>.<signature>

* ``QP1``        format and version
* ``kid``        id of the service key that signed it (keys rotate; gateways hold several)
* ``account``    the driver's account id
* ``issued_at``  / ``expires_at``: Unix seconds (UTC); lifetime is 60 s by default
* ``nonce``      12 random bytes, base64url: makes every code unique, so a reused code is seen
* ``signature``  Ed25519 over everything before the last dot, base64url without padding

Verification is offline (public keys only), pure (the caller passes ``now``) and reports one
distinct :class:`~parking_protocol.types.CodeRejection` per failure. Replay (a nonce used
before) is checked by whoever keeps the record of used nonces: the central service, and a
gateway's local cache while offline.

>>> from datetime import UTC, datetime
>>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
>>> key = Ed25519PrivateKey.generate()
>>> now = datetime(2026, 1, 1, tzinfo=UTC)
>>> code = issue_code(key, kid="k1", account_id="alice", now=now)
>>> verify_code(code, {"k1": key.public_key()}, now=now).account_id
'alice'
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from parking_protocol.types import CodeRejection

__all__ = [
    "CODE_PREFIX",
    "DEFAULT_LIFETIME",
    "DEFAULT_SKEW",
    "MAX_LIFETIME",
    "CodeClaims",
    "CodeRejected",
    "Proven",
    "issue_code",
    "load_public_key",
    "parse_code",
    "public_key_text",
    "verify_code",
]

CODE_PREFIX = "QP1"
DEFAULT_LIFETIME = timedelta(seconds=60)
DEFAULT_SKEW = timedelta(seconds=5)
# A code that claims to live longer than this is refused even if signed (key misuse).
MAX_LIFETIME = timedelta(minutes=10)
MAX_CODE_LENGTH = 256

_ID = r"[A-Za-z0-9_-]{1,36}"
_B64 = r"[A-Za-z0-9_-]+"
_CODE_RE = re.compile(
    rf"^(?P<body>(?P<ver>QP[0-9]+)\.(?P<kid>{_ID})\.(?P<acct>{_ID})\.(?P<iat>[0-9]{{1,12}})"
    rf"\.(?P<exp>[0-9]{{1,12}})\.(?P<nonce>{_B64}))\.(?P<sig>{_B64})$"
)


class CodeRejected(ValueError):
    """A code that must not open a gate, with the reason."""

    def __init__(self, reason: CodeRejection, detail: str = "") -> None:
        super().__init__(f"{reason.value}{': ' + detail if detail else ''}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CodeClaims:
    """What a structurally valid code says (not yet proven authentic)."""

    kid: str
    account_id: str
    issued_at: datetime
    expires_at: datetime
    nonce: str
    signed_part: bytes
    signature: bytes


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_code(
    key: Ed25519PrivateKey,
    *,
    kid: str,
    account_id: str,
    now: datetime,
    lifetime: timedelta = DEFAULT_LIFETIME,
    nonce: bytes | None = None,
) -> str:
    """Sign a fresh code for ``account_id`` valid from ``now`` for ``lifetime``."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not re.fullmatch(_ID, kid) or not re.fullmatch(_ID, account_id):
        raise ValueError("kid and account_id must match [A-Za-z0-9_-]{1,36}")
    iat = int(now.timestamp())
    exp = iat + max(1, int(lifetime.total_seconds()))
    nonce_text = _b64(nonce if nonce is not None else secrets.token_bytes(12))
    body = f"{CODE_PREFIX}.{kid}.{account_id}.{iat}.{exp}.{nonce_text}"
    return f"{body}.{_b64(key.sign(body.encode()))}"


def parse_code(code: str) -> CodeClaims:
    """Split a code into its claims; :class:`CodeRejected` if it is not a code of ours."""
    if not isinstance(code, str) or len(code) > MAX_CODE_LENGTH:
        raise CodeRejected(CodeRejection.MALFORMED, "not a parking code")
    match = _CODE_RE.match(code.strip())
    if match is None:
        head, dot, _ = code.partition(".")
        if dot and re.fullmatch(r"QP[0-9]+", head) and head != CODE_PREFIX:
            raise CodeRejected(CodeRejection.UNKNOWN_VERSION, head)
        raise CodeRejected(CodeRejection.MALFORMED, "not a parking code")
    if match["ver"] != CODE_PREFIX:
        raise CodeRejected(CodeRejection.UNKNOWN_VERSION, match["ver"])
    try:
        signature = _unb64(match["sig"])
        nonce = _unb64(match["nonce"])
        issued_at = datetime.fromtimestamp(int(match["iat"]), UTC)
        expires_at = datetime.fromtimestamp(int(match["exp"]), UTC)
    except (binascii.Error, ValueError, OverflowError, OSError) as exc:
        raise CodeRejected(CodeRejection.MALFORMED, str(exc)) from None
    if len(signature) != 64:
        raise CodeRejected(CodeRejection.MALFORMED, "signature length")
    if _b64(signature) != match["sig"] or _b64(nonce) != match["nonce"]:
        # Only the canonical encoding is a code: otherwise the last character's unused bits
        # would let many texts carry one signature.
        raise CodeRejected(CodeRejection.MALFORMED, "non-canonical signature encoding")
    return CodeClaims(
        kid=match["kid"],
        account_id=match["acct"],
        issued_at=issued_at,
        expires_at=expires_at,
        nonce=match["nonce"],
        signed_part=match["body"].encode(),
        signature=signature,
    )


Proven = Callable[[str], "tuple[CodeClaims, bytes] | None"]
"""``proven(code)``: the claims of a code whose signature was already checked and found good
(e.g. by the service's ``server.signatures.SignatureChecker``), with the public key it was
checked under; or None."""


def verify_code(
    code: str,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    now: datetime,
    skew: timedelta = DEFAULT_SKEW,
    proven: Proven | None = None,
) -> CodeClaims:
    """Check format, key, signature and validity window at ``now``; return the claims.

    Raises :class:`CodeRejected` with a distinct reason for each failure. Checks run from
    the cheapest to the signature, and the time window only after the signature, so an
    attacker learns nothing about timing from a forged code. ``proven`` may vouch for the
    code's form and signature (checked ahead; it counts only if checked under the key the
    code's ``kid`` names now); the key's presence and the time window are checked here.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    ahead = proven(code) if proven is not None else None
    claims = ahead[0] if ahead is not None else parse_code(code)
    key = keys.get(claims.kid)
    if key is None:
        raise CodeRejected(CodeRejection.UNKNOWN_KEY, claims.kid)
    raw = key.public_bytes_raw()
    if ahead is None or ahead[1] != raw:
        try:
            # libsodium (PyNaCl) checks an Ed25519 signature in about half the time OpenSSL
            # (cryptography) takes on the machines measured (docs/scaling.md): at a busy
            # service it was the largest single cost of an event. Keys and signing stay
            # with cryptography.
            crypto_sign_open(claims.signature + claims.signed_part, raw)
        except BadSignatureError:
            raise CodeRejected(CodeRejection.BAD_SIGNATURE) from None
    if claims.expires_at <= claims.issued_at or (
        claims.expires_at - claims.issued_at > MAX_LIFETIME
    ):
        raise CodeRejected(CodeRejection.MALFORMED, "lifetime out of range")
    if now + skew < claims.issued_at:
        raise CodeRejected(CodeRejection.NOT_YET_VALID, claims.issued_at.isoformat())
    if now - skew >= claims.expires_at:
        raise CodeRejected(CodeRejection.EXPIRED, claims.expires_at.isoformat())
    return claims


def public_key_text(key: Ed25519PublicKey) -> str:
    """A public key as 43 characters of base64url, for gateway configs and the API."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64(raw)


def load_public_key(text: str) -> Ed25519PublicKey:
    """Inverse of :func:`public_key_text`; also accepts a PEM block."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    try:
        raw = _unb64(text)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a base64url Ed25519 public key: {exc}") from None
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)
