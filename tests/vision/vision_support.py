"""Real parking codes and decoders for the vision tests (shared by their modules).

Codes are signed with a fixed key and fixed nonces, and frames come from seeded generators,
so every run renders exactly the same frames: a read-rate threshold cannot flake.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from service_guard import missing_service

from gateway_firmware.hardware.decoders import (
    DecoderUnavailable,
    OpenCVDecoder,
    PyzbarDecoder,
    ZxingDecoder,
)
from gateway_firmware.hardware.interfaces import Decoder
from parking_protocol.qr_token import issue_code

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NOW = datetime(2026, 11, 2, 8, 30, tzinfo=UTC)

CodeFactory = Callable[[int], str]


def real_code(i: int) -> str:
    """The i-th code: real format, ~150 characters, distinct for every i."""
    return issue_code(
        KEY,
        kid="k1",
        account_id=f"acc_{i:016x}",
        now=NOW,
        nonce=hashlib.sha256(i.to_bytes(8, "big")).digest()[:12],
    )


DECODER_CLASSES: dict[str, Callable[[], Decoder]] = {
    "zxing": ZxingDecoder,
    "pyzbar": PyzbarDecoder,
    "opencv": OpenCVDecoder,
}


def build_decoder(backend: str) -> Decoder:
    """The backend's decoder; pyzbar skips (only) when libzbar cannot be loaded."""
    try:
        return DECODER_CLASSES[backend]()
    except DecoderUnavailable as exc:
        if backend == "pyzbar":
            missing_service(f"libzbar is not installed (apt-get install libzbar0): {exc}")
        raise
