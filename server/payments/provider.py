"""Payment methods behind one small interface: the prepaid wallet and a sandbox card.

A provider answers *may we take this money* (authorise), *take it* (capture) and *give it
back* (refund), each call carrying an idempotency key: repeating a call with the same key
returns the first result, so a retry after a timeout or a redelivered exit never charges
twice. A key is bound to the amount it was first used with: the same key with another
amount is refused with :class:`PaymentKeyReused`, which says what the first attempt was for
(Stripe answers such a request with an ``idempotency_error``; a real adapter then looks the
first request up). Where the money sits in our ledger is the provider's ``source_account``.

The :class:`SandboxCardProvider` behaves like a card network in test mode: the card token
chooses the outcome (``tok_ok``, ``tok_decline``, ``tok_timeout``, ``tok_error``,
``tok_capture_fail``, ``tok_refund_fail``), or ``mode`` / :meth:`script` force one, and
every call is recorded on ``calls`` so tests assert on what happened::

    card = SandboxCardProvider()
    card.script("timeout", "ok")   # the next call times out, the one after succeeds
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, TypeVar

from sqlmodel import Session

from parking_protocol.messages import new_id
from parking_protocol.types import Money
from server.accounts import book
from server.accounts.ledger import clearing_account, wallet_account

log = logging.getLogger(__name__)
_T = TypeVar("_T")

__all__ = [
    "DEFAULT_CALL_TIMEOUT_S",
    "Authorisation",
    "BoundedProvider",
    "CardOutcome",
    "ChargeContext",
    "PaymentDeclined",
    "PaymentError",
    "PaymentFailed",
    "PaymentKeyReused",
    "PaymentProvider",
    "PaymentProviders",
    "PaymentTimeout",
    "SandboxCardProvider",
    "WalletProvider",
]


class PaymentError(Exception):
    """A payment that did not happen; ``reason`` is short and machine-readable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PaymentDeclined(PaymentError):
    """A definite no (insufficient balance, card declined): retrying will not help."""


class PaymentTimeout(PaymentError):
    """No answer: the outcome is unknown; retry with the same idempotency key."""


class PaymentFailed(PaymentError):
    """The provider failed (an error answer, a failed capture or refund)."""


class PaymentKeyReused(PaymentError):
    """The idempotency key was first used with another amount, ``first``: nothing was done.

    Retrying with the key and ``first`` gets the first attempt's result (or completes it).
    """

    def __init__(self, reason: str, first: Money) -> None:
        super().__init__(reason)
        self.first = first


@dataclass(frozen=True, slots=True)
class ChargeContext:
    """Who pays, with what: the DB session (the wallet reads its balance) and a card token."""

    db: Session
    account_id: str
    card_token: str | None = None


@dataclass(frozen=True, slots=True)
class Authorisation:
    provider: str
    auth_id: str
    amount: Money


class PaymentProvider(Protocol):
    """One way to pay. Implementations must honour idempotency keys, and refuse a key used
    again with another amount with :class:`PaymentKeyReused` (see module doc)."""

    name: str

    def source_account(self, account_id: str) -> str:
        """The ledger account the money comes from (and refunds go back to)."""
        ...

    def authorise(self, ctx: ChargeContext, amount: Money, *, key: str) -> Authorisation: ...

    def capture(self, ctx: ChargeContext, auth: Authorisation, *, key: str) -> str:
        """Take the authorised money; returns the provider's reference for refunds."""
        ...

    def void(self, ctx: ChargeContext, auth: Authorisation) -> None: ...

    def refund(self, ctx: ChargeContext, capture_ref: str, amount: Money, *, key: str) -> str:
        """Give (part of) a capture back; returns the refund's reference."""
        ...


class WalletProvider:
    """The built-in prepaid wallet: the money is already in the ledger."""

    name = "wallet"

    def source_account(self, account_id: str) -> str:
        return wallet_account(account_id)

    def authorise(self, ctx: ChargeContext, amount: Money, *, key: str) -> Authorisation:
        available = book.balance_of(ctx.db, wallet_account(ctx.account_id), amount.currency)
        if available < amount.amount_minor:
            raise PaymentDeclined("insufficient_balance")
        return Authorisation(self.name, f"wallet:{key}", amount)

    def capture(self, ctx: ChargeContext, auth: Authorisation, *, key: str) -> str:
        return auth.auth_id  # the ledger transaction is the capture

    def void(self, ctx: ChargeContext, auth: Authorisation) -> None:
        return None

    def refund(self, ctx: ChargeContext, capture_ref: str, amount: Money, *, key: str) -> str:
        return f"wallet-refund:{key}"


CardOutcome = Literal["ok", "decline", "timeout", "timeout_after", "error"]
_TOKENS: dict[str, tuple[str, CardOutcome]] = {
    "tok_ok": ("authorise", "ok"),
    "tok_decline": ("authorise", "decline"),
    "tok_timeout": ("authorise", "timeout"),
    "tok_error": ("authorise", "error"),
    "tok_capture_fail": ("capture", "error"),
    "tok_refund_fail": ("refund", "error"),
}


@dataclass
class SandboxCardProvider:
    """A card provider in test mode (in memory, thread-safe).

    ``mode`` forces every call's outcome (``None``: the token decides). ``timeout_after``
    means the provider did the work but the answer was lost: a capture is taken all the
    same, and a retry with the same key (and amount) gets the stored result. A key used
    again with another amount is refused, as Stripe does.
    """

    # The test cards a driver may choose on the driver page (token, label).
    TEST_CARDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("tok_ok", "Test card - approved"),
        ("tok_decline", "Test card - declined"),
        ("tok_timeout", "Test card - no answer"),
        ("tok_error", "Test card - provider error"),
        ("tok_capture_fail", "Test card - capture fails"),
    )

    name: str = "card"
    mode: CardOutcome | None = None
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (operation, key, outcome)
    _scripted: deque[CardOutcome] = field(default_factory=deque)
    _results: dict[tuple[str, str], tuple[str, Money]] = field(default_factory=dict)
    _captured: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, *outcomes: CardOutcome) -> None:
        """Force the outcomes of the next calls that reach the network, in order."""
        with self._lock:
            self._scripted.extend(outcomes)

    def source_account(self, account_id: str) -> str:
        return clearing_account(self.name)

    def _call(self, operation: str, key: str, token: str | None, amount: Money) -> str:
        with self._lock:
            stored = self._results.get((operation, key))
            if stored is not None:
                result, first = stored
                if first != amount:
                    self.calls.append((operation, key, "key_reused"))
                    raise PaymentKeyReused(f"{operation}_key_reused", first)
                self.calls.append((operation, key, "replayed"))
                return result
            if self._scripted:
                outcome: CardOutcome = self._scripted.popleft()
            elif self.mode is not None:
                outcome = self.mode
            else:
                failing_at, token_outcome = _TOKENS.get(token or "", ("authorise", "decline"))
                outcome = token_outcome if failing_at == operation else "ok"
            self.calls.append((operation, key, outcome))
            if outcome == "decline" and operation == "authorise":
                raise PaymentDeclined("card_declined")
            if outcome == "timeout":
                raise PaymentTimeout(f"{operation}_timeout")
            if outcome in ("error", "decline"):
                raise PaymentFailed(f"{operation}_failed")
            result = f"{operation[:3]}_{new_id()[-12:]}"  # the random end of a UUIDv7
            self._results[(operation, key)] = (result, amount)
            if operation == "capture":
                self._captured[result] = amount.amount_minor  # taken, whether or not we hear
            if outcome == "timeout_after":
                raise PaymentTimeout(f"{operation}_timeout")
            return result

    def authorise(self, ctx: ChargeContext, amount: Money, *, key: str) -> Authorisation:
        return Authorisation(
            self.name, self._call("authorise", key, ctx.card_token, amount), amount
        )

    def capture(self, ctx: ChargeContext, auth: Authorisation, *, key: str) -> str:
        return self._call("capture", key, ctx.card_token, auth.amount)

    def void(self, ctx: ChargeContext, auth: Authorisation) -> None:
        with self._lock:
            self.calls.append(("void", auth.auth_id, "ok"))

    def refund(self, ctx: ChargeContext, capture_ref: str, amount: Money, *, key: str) -> str:
        with self._lock:
            if capture_ref not in self._captured:
                raise PaymentFailed("refund_unknown_capture")
        return self._call("refund", key, ctx.card_token, amount)

    def captured_minor(self) -> int:
        """What the card network took in total (tests compare it with the clearing account)."""
        with self._lock:
            return sum(self._captured.values())


DEFAULT_CALL_TIMEOUT_S = 5.0
"""How long one call to a card provider may take before it counts as a timeout."""


@dataclass
class BoundedProvider:
    """Another provider whose calls give up after ``timeout_s``: a :class:`PaymentTimeout`.

    The call goes on in a worker thread and its answer is dropped, as if the network had
    lost it; the provider's idempotency keys make the retry find what it did. So a slow
    card network cannot hold a scan (and, on SQLite, the database's write lock) for longer
    than the bound. A void that times out is given up (it only releases a hold). The
    wrapped provider runs off the caller's thread, so it must not use ``ctx.db`` (a card
    network never does; the wallet, which does, is never wrapped).
    """

    inner: PaymentProvider
    timeout_s: float
    pool: ThreadPoolExecutor
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.inner.name

    def _bounded(self, operation: str, call: Callable[[], _T]) -> _T:
        future = self.pool.submit(call)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            future.cancel()  # not started yet (every worker busy): it never runs
            raise PaymentTimeout(f"{operation}_timeout") from None

    def source_account(self, account_id: str) -> str:
        return self.inner.source_account(account_id)

    def authorise(self, ctx: ChargeContext, amount: Money, *, key: str) -> Authorisation:
        return self._bounded("authorise", lambda: self.inner.authorise(ctx, amount, key=key))

    def capture(self, ctx: ChargeContext, auth: Authorisation, *, key: str) -> str:
        return self._bounded("capture", lambda: self.inner.capture(ctx, auth, key=key))

    def void(self, ctx: ChargeContext, auth: Authorisation) -> None:
        try:
            self._bounded("void", lambda: self.inner.void(ctx, auth))
        except PaymentTimeout:
            log.warning("void of %s not confirmed in %ss", auth.auth_id, self.timeout_s)

    def refund(self, ctx: ChargeContext, capture_ref: str, amount: Money, *, key: str) -> str:
        return self._bounded("refund", lambda: self.inner.refund(ctx, capture_ref, amount, key=key))


@dataclass
class PaymentProviders:
    """The providers a service uses, by payment method name.

    :meth:`get` hands out the card provider bounded by ``call_timeout_s`` (None: unbounded);
    the wallet is only the ledger, never waited on.
    """

    wallet: PaymentProvider = field(default_factory=WalletProvider)
    card: PaymentProvider = field(default_factory=SandboxCardProvider)
    call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _pool_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def get(self, method: str) -> PaymentProvider:
        if method != "card":
            return self.wallet
        if self.call_timeout_s is None:
            return self.card
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="payments")
            pool = self._pool
        return BoundedProvider(self.card, self.call_timeout_s, pool)
