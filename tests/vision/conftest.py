"""Fixtures for the vision tests: real codes, and each decoder backend in turn."""

from __future__ import annotations

import pytest
from vision_support import DECODER_CLASSES, CodeFactory, build_decoder, real_code

from gateway_firmware.hardware.interfaces import Decoder


@pytest.fixture
def code() -> CodeFactory:
    return real_code


@pytest.fixture(params=list(DECODER_CLASSES))
def any_decoder(request: pytest.FixtureRequest) -> Decoder:
    """Each backend in turn: the same behaviour suite runs over all of them."""
    return build_decoder(request.param)


@pytest.fixture
def zxing() -> Decoder:
    return build_decoder("zxing")
