"""Local infrastructure for the demo and the tests: a Mosquitto broker on a free port.

The broker is the real Mosquitto binary (Debian/Raspberry Pi OS package ``mosquitto``) with
``set_tcp_nodelay true``. When the binary is missing, callers may fall back to an embedded
broker only if they say so, and must label it (the demo does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MosquittoProcess", "free_port", "mosquitto_binary", "port_open"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str | None:
    for candidate in ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


@dataclass
class MosquittoProcess:
    """A private Mosquitto on 127.0.0.1:<port>; ``extra_config`` lines are appended."""

    port: int = field(default_factory=free_port)
    extra_config: str = "allow_anonymous true\n"
    persistence: bool = False
    workdir: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        assert self.workdir is not None
        lines = [
            f"listener {self.port} 127.0.0.1",
            "set_tcp_nodelay true",
            "max_queued_messages 100000",
            # As deploy/mosquitto: the window of QoS 1 messages in flight per client (and
            # the Receive Maximum it grants); the default 20 costs the service a round
            # trip per 20 commands or events.
            "max_inflight_messages 1000",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            # Started as root, Mosquitto would switch to the "mosquitto" user and could not
            # read our private config files; a private broker runs as whoever started it.
            lines.append("user root")
        return "\n".join(lines) + "\n" + self.extra_config

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="qrpark-mosquitto-"))
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own binary and config
                [binary, "-c", str(conf)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.process.returncode}: "
                    + (self.workdir / "mosquitto.log").read_text(errors="replace")[-2000:]
                )
            if port_open("127.0.0.1", self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
