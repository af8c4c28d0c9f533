"""Pure lane logic: no IO, takes ``now`` and data, returns data."""

from gateway_firmware.core.debounce import Debouncer
from gateway_firmware.core.lane import Lane, LaneState
from gateway_firmware.core.local_verify import LocalVerifier, NonceCache

__all__ = ["Debouncer", "Lane", "LaneState", "LocalVerifier", "NonceCache"]
