"""The gateway's link to the central service: durable outbox, MQTT topics, status/last will."""

from gateway_firmware.uplink.link import Uplink, status_will
from gateway_firmware.uplink.outbox import Outbox

__all__ = ["Outbox", "Uplink", "status_will"]
