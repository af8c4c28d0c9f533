"""``qrpark``: one command for every deployable, importing only what the subcommand needs.

qrpark demo      the whole system on this machine (broker, service, simulated lot)
qrpark server    the central service (needs the ``server`` extra)
qrpark gateway   the gateway firmware (needs the ``gateway`` extra; also ``qrpark-gateway``)
qrpark schema    print the wire protocol's JSON Schema
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]


def _server(argv: list[str]) -> int:
    from server.cli import main as server_main

    return server_main(argv)


def _gateway(argv: list[str]) -> int:
    from gateway_firmware.cli import main as gateway_main

    return gateway_main(argv)


def _demo(argv: list[str]) -> int:
    from qrpark.demo import main as demo_main

    return demo_main(argv)


def _sim(argv: list[str]) -> int:
    from sim_devices.cli import main as sim_main

    return sim_main(argv)


def _broker_config(argv: list[str]) -> int:
    from qrpark.broker import main as broker_main

    return broker_main(argv)


def _simtest(argv: list[str]) -> int:
    from qrpark.simtest import main as simtest_main

    return simtest_main(argv)


def _schema(argv: list[str]) -> int:
    from parking_protocol.schema import render

    sys.stdout.write(render())
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo": _demo,
    "server": _server,
    "gateway": _gateway,
    "sim": _sim,
    "simtest": _simtest,
    "schema": _schema,
    "broker-config": _broker_config,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(__doc__ or "")
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        sys.stderr.write(f"qrpark: unknown command {args[0]!r}; try: {', '.join(COMMANDS)}\n")
        return 2
    try:
        return command(args[1:])
    except ModuleNotFoundError as exc:
        sys.stderr.write(
            f"qrpark {args[0]}: missing dependency {exc.name!r}; install the matching extra, "
            "e.g. pip install 'qrpark[server]' or 'qrpark[gateway]'\n"
        )
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
