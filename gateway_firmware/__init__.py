"""The gateway firmware: one lane controller on a Raspberry Pi (camera, decoder, relay, MQTT).

It imports only the wire contract (``parking_protocol``), pydantic(-settings), numpy and,
lazily, the hardware libraries; never the server. Start it with ``qrpark-gateway`` or build
one in-process with :func:`build_gateway`.
"""

from gateway_firmware.app import (
    Gateway,
    GatewayStats,
    Hardware,
    Tuning,
    build_gateway,
    make_transport,
    real_hardware,
)
from gateway_firmware.config import ConfigError, GatewaySettings, load_settings
from gateway_firmware.uplink.link import status_will
from gateway_firmware.uplink.outbox import Outbox

__all__ = [
    "ConfigError",
    "Gateway",
    "GatewaySettings",
    "GatewayStats",
    "Hardware",
    "Outbox",
    "Tuning",
    "build_gateway",
    "load_settings",
    "make_transport",
    "real_hardware",
    "status_will",
]
