"""The sandbox card network keeps the promises a real one does: a capture whose answer was
lost was still taken, and an idempotency key is bound to the amount it was first used with."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from parking_protocol.types import Money
from server.payments.provider import (
    ChargeContext,
    PaymentKeyReused,
    PaymentTimeout,
    SandboxCardProvider,
)


def cny(amount_minor: int) -> Money:
    return Money(amount_minor=amount_minor, currency="CNY")


@pytest.fixture
def ctx() -> Iterator[ChargeContext]:
    engine = sa.create_engine("sqlite://")
    with Session(engine) as db:
        yield ChargeContext(db, "carol", "tok_ok")
    engine.dispose()


def test_a_capture_whose_answer_was_lost_was_still_taken(ctx: ChargeContext) -> None:
    card = SandboxCardProvider()
    card.script("ok", "timeout_after")
    auth = card.authorise(ctx, cny(1000), key="k")

    with pytest.raises(PaymentTimeout):
        card.capture(ctx, auth, key="k")

    assert card.captured_minor() == 1000
    assert card.capture(ctx, auth, key="k")  # the retry gets the stored capture ...
    assert card.captured_minor() == 1000  # ... and takes nothing more


def test_a_key_used_again_with_another_amount_is_refused_and_names_the_first(
    ctx: ChargeContext,
) -> None:
    card = SandboxCardProvider()
    auth = card.authorise(ctx, cny(1000), key="k")
    ref = card.capture(ctx, auth, key="k")

    with pytest.raises(PaymentKeyReused) as reused:
        card.authorise(ctx, cny(1500), key="k")
    assert reused.value.first == cny(1000)
    card.refund(ctx, ref, cny(100), key="r")
    with pytest.raises(PaymentKeyReused):
        card.refund(ctx, ref, cny(200), key="r")

    assert card.authorise(ctx, cny(1000), key="k") == auth  # the same amount replays
    assert card.captured_minor() == 1000
