"""Code signatures checked ahead of need, on a thread of their own (the central service's).

The wire contract's :func:`~parking_protocol.qr_token.verify_code` stays pure: it takes a
``proven`` hook, and this is the service's implementation of it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import OrderedDict
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from parking_protocol.qr_token import CodeClaims, CodeRejected, parse_code

__all__ = ["SignatureChecker"]


class SignatureChecker:
    """Checks codes' signatures ahead of need, on a thread of its own.

    The central service hands it every scanned code as the event arrives (:meth:`submit`,
    a queue put) and passes :meth:`proven` to :func:`verify_code` when it decides the event,
    usually a batch later. libsodium releases the GIL while it checks, so the check runs on
    another core beside the service's database and event-loop threads instead of on the
    one thread all decisions pass through. What it has not checked in time (or found bad:
    it keeps only good signatures) :func:`verify_code` checks itself, so it only ever saves
    work: the signature check and the parsing (the claims are immutable). At most
    ``capacity`` results wait to be used; the oldest go first.
    """

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self.checked = 0
        self.used = 0
        self._queue: queue.SimpleQueue[tuple[str, Mapping[str, Ed25519PublicKey]] | None] = (
            queue.SimpleQueue()
        )
        self._good: OrderedDict[str, tuple[CodeClaims, bytes]] = OrderedDict()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qrpark-signatures", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(5)

    def submit(self, code: str, keys: Mapping[str, Ed25519PublicKey]) -> None:
        """Check ``code`` soon (ignored while not started)."""
        if self._thread is not None:
            self._queue.put((code, keys))

    def proven(self, code: str) -> tuple[CodeClaims, bytes] | None:
        """The claims of ``code`` if its signature was found good, with the public key it
        was checked under (see :data:`Proven`); each result is used once."""
        found = self._good.pop(code, None)
        if found is not None:
            self.used += 1
        return found

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            code, keys = item
            try:
                claims = parse_code(code)
                key = keys.get(claims.kid)
                if key is None:
                    continue
                raw = key.public_bytes_raw()
                crypto_sign_open(claims.signature + claims.signed_part, raw)
            except (CodeRejected, BadSignatureError, ValueError, TypeError):
                continue  # verify_code finds it again and says why
            self.checked += 1
            self._good[code] = (claims, raw)
            while len(self._good) > self.capacity:
                with contextlib.suppress(KeyError):
                    self._good.popitem(last=False)
