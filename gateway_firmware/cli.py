"""``qrpark-gateway``: run one lane controller until SIGINT/SIGTERM.

::

    qrpark-gateway --config /etc/qrpark/gateway.toml            # hardware from the file
    qrpark-gateway --config gateway.toml --hardware sim          # simulated devices

Exit codes: 0 clean shutdown, 1 the hardware or broker setup failed, 2 a bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway_firmware.app import Hardware, build_gateway, make_transport, real_hardware
from gateway_firmware.config import ConfigError, GatewaySettings, load_settings
from gateway_firmware.uplink.outbox import Outbox
from parking_protocol.clock import SystemClock

__all__ = ["JsonFormatter", "main"]

log = logging.getLogger("gateway_firmware")


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the gateway's ``context`` (lot,
    gate), fields passed with ``extra=`` (``event_id``...), and exc when there is one.

    >>> # {"ts": "...", "level": "info", "logger": "gateway_firmware.app", "lot": "lot1",
    >>> #  "gate": "in1", "msg": "offline decision for 1d32...: open (welcome)"}
    """

    def __init__(self, context: dict[str, str] | None = None) -> None:
        super().__init__()
        self.context = dict(context or {})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            **self.context,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(fmt: str, level: str, context: dict[str, str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(context))
    else:
        handler.setFormatter(
            logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qrpark-gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the gateway's TOML file")
    parser.add_argument(
        "--hardware",
        choices=("sim", "real"),
        help="override the file's hardware setting (never chosen silently)",
    )
    return parser


def sim_hardware_plugin(settings: GatewaySettings) -> Hardware:
    """The simulator's devices, loaded only when asked for (the firmware never needs them)."""
    try:
        module = importlib.import_module("sim_devices.devices")
    except ImportError as exc:
        raise ConfigError(f"hardware = 'sim' needs the simulator (qrpark[sim]): {exc}") from None
    hardware = module.idle_lane_hardware(settings)
    if not isinstance(hardware, Hardware):
        raise ConfigError("sim_devices.devices.idle_lane_hardware did not return Hardware")
    return hardware


async def run(settings: GatewaySettings) -> int:
    clock = SystemClock()
    outbox = Outbox(settings.outbox_file)
    try:
        transport = make_transport(settings, boot=outbox.boot, clock=clock)
    except ConfigError:
        outbox.close()
        raise
    try:
        hardware = (
            real_hardware(settings)
            if settings.hardware == "real"
            else (sim_hardware_plugin(settings))
        )
    except Exception:
        log.exception("cannot set up the %s hardware", settings.hardware)
        outbox.close()
        return 1
    gateway = build_gateway(
        settings, hardware=hardware, transport=transport, clock=clock, outbox=outbox
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, gateway.stop)
    try:
        await gateway.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        gateway.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {"hardware": args.hardware} if args.hardware else {}
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"qrpark-gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(
        settings.log_format,
        settings.log_level,
        {"lot": settings.lot_id, "gate": settings.gate_id},
    )
    try:
        return asyncio.run(run(settings))
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
