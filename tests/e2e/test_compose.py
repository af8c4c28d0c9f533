"""docker-compose.yml, checked without Docker: its files, variables, broker and whole stack.

No Docker engine runs here, so each service runs natively from what the compose file says:
Mosquitto with the committed deploy/ config (container paths mapped to a temp dir), its
healthcheck's exact command, and the central service and simulated lot with their compose
commands and environment. Only host names, ports and volume paths are rewritten to local
ones (and PostgreSQL is a fresh database of the test server).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from service_guard import missing_service

from gateway_firmware.config import ENV_PREFIX as GATEWAY_ENV_PREFIX
from gateway_firmware.config import GatewaySettings
from parking_protocol.mqtt import MqttTransport, parse_broker_url
from qrpark.broker import gateway_username
from qrpark.services import MosquittoProcess, free_port, mosquitto_binary
from server.config import ServerSettings

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BIN = Path(sys.executable).parent

# What compose does to "$$" and "${NAME:-default}", with nothing set in the caller's shell.
_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(:?-)([^}]*)\}|\$\{?\w+\}?")


def interpolate(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(2) is not None:
            return match.group(3)
        raise AssertionError(f"{match.group(0)} in docker-compose.yml has no default")

    return _INTERPOLATION.sub(replace, text)


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: interpolate(str(value)) for name, value in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str

    @property
    def is_bind(self) -> bool:
        return self.source.startswith((".", "/"))


def mounts(service: str) -> list[Mount]:
    found = []
    for text in SERVICES[service].get("volumes") or []:
        source, target, *_ = interpolate(text).split(":")
        found.append(Mount(source, target))
    return found


def container_port(service: str) -> int:
    (mapping,) = SERVICES[service]["ports"]
    return int(str(mapping).rsplit(":", 1)[-1])


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


# -- files and variables ----------------------------------------------------------------------


def test_every_file_compose_and_the_dockerfile_use_is_in_the_repo() -> None:
    for name, service in SERVICES.items():
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file(), name
        for mount in mounts(name):
            if mount.is_bind:
                assert (ROOT / mount.source).is_file(), f"{name} mounts missing {mount.source}"
            else:
                assert mount.source in (COMPOSE.get("volumes") or {}), mount.source
    for line in dockerfile().splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def _known_variables(command: list[str]) -> set[str]:
    """The QRPARK_* names the process a compose command starts actually reads."""
    subcommand = command[1]
    if subcommand == "server":
        return {f"QRPARK_{name.upper()}" for name in ServerSettings.model_fields}
    if subcommand == "demo":  # os.environ reads in qrpark/demo.py, and its gateways' settings
        source = (ROOT / "qrpark" / "demo.py").read_text()
        names = set(re.findall(r"os\.environ(?:\.get\(|\[)\s*\"(QRPARK_\w+)\"", source))
        return names | {GATEWAY_ENV_PREFIX + n.upper() for n in GatewaySettings.model_fields}
    raise AssertionError(f"no known settings for a service running {command}")


@pytest.mark.parametrize("service", [n for n, s in SERVICES.items() if "build" in s])
def test_every_qrpark_variable_in_compose_is_one_its_service_reads(service: str) -> None:
    command = SERVICES[service]["command"]
    assert command[0] == "qrpark"
    unknown = {n for n in environment(service) if n.startswith("QRPARK_")} - _known_variables(
        command
    )
    assert not unknown, f"{service} sets variables nothing reads: {sorted(unknown)}"


def test_central_settings_from_compose_validate_and_match_the_other_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("QRPARK_"):
            monkeypatch.delenv(name)
    central = environment("central")
    for name, value in central.items():
        monkeypatch.setenv(name, value)
    settings = ServerSettings()  # a bad value fails here, naming the field

    pg = environment("postgres")
    assert settings.database_url == (
        f"postgresql+psycopg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{pg['POSTGRES_DB']}"
    )
    broker = parse_broker_url(settings.mqtt_url)
    assert (broker.host, broker.port) == ("mosquitto", container_port("mosquitto"))
    # The key lives on the central-keys volume, so it survives a rebuild.
    key_dirs = [PurePosixPath(m.target) for m in mounts("central") if not m.is_bind]
    assert any(PurePosixPath(settings.key_file).is_relative_to(d) for d in key_dirs)
    # The simulated lot calls the API with the token the service registers at start.
    assert settings.bootstrap_api_token is not None
    lot = environment("sim-lot")
    assert lot["QRPARK_API_TOKEN"] == settings.bootstrap_api_token.get_secret_value()
    command = SERVICES["sim-lot"]["command"]
    assert command[command.index("--broker") + 1] == f"mqtt://mosquitto:{broker.port}"
    assert command[command.index("--server") + 1] == f"http://central:{container_port('central')}"


def test_the_images_volume_directories_belong_to_its_user() -> None:
    """A new named volume takes the owner of the image's directory: root would lock us out."""
    text = dockerfile().replace("\\\n", " ")
    (user,) = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    for name, service in SERVICES.items():
        if "build" not in service:
            continue
        for mount in mounts(name):
            target = PurePosixPath(mount.target)
            made = any("mkdir" in run and str(target) in run for run in runs)
            owners = [target, *target.parents]
            owned = any(
                re.search(rf"chown (-R )?{user} {owner}(\s|$)", run)
                and (owner == target or "chown -R" in run)
                for run in runs
                for owner in owners
            )
            assert made and owned, f"{name}: {target} is not created and owned by {user}"


# -- the broker, from the committed deploy/ config -------------------------------------------


class ComposeMosquitto(MosquittoProcess):
    """deploy/mosquitto/mosquitto.conf as compose mounts it, under a temp root, on a free port."""

    def config_text(self) -> str:
        assert self.workdir is not None
        root = self.workdir / "container"
        targets = []
        for mount in mounts("mosquitto"):
            local = root / mount.target.lstrip("/")
            if mount.is_bind:
                local.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / mount.source, local)
            else:
                local.mkdir(parents=True, exist_ok=True)
            targets.append(mount.target.rstrip("/"))
        (conf_mount,) = [m for m in mounts("mosquitto") if m.target.endswith(".conf")]
        text = (ROOT / conf_mount.source).read_text()
        listeners = re.findall(r"^listener (\d+)", text, re.MULTILINE)
        assert listeners == [str(container_port("mosquitto"))], listeners
        text = re.sub(r"^listener \d+.*$", f"listener {self.port} 127.0.0.1", text, flags=re.M)
        paths = "|".join(re.escape(t) for t in sorted(targets, key=len, reverse=True))
        text = re.sub(rf"(?<![\w/])(?:{paths})(?=/|\s|$)", lambda m: f"{root}{m[0]}", text)
        if os.geteuid() == 0:  # the container drops to its own "mosquitto" user
            text += "\nuser root\n"
        return text


@pytest.fixture(scope="module")
def compose_broker() -> Iterator[ComposeMosquitto]:
    if mosquitto_binary() is None:
        missing_service("mosquitto binary not installed (apt-get install mosquitto)")
    with ComposeMosquitto() as broker:
        yield broker


def test_mosquitto_healthcheck_passes_against_the_committed_config(
    compose_broker: ComposeMosquitto, tmp_path: Path
) -> None:
    """central waits for this healthcheck (service_healthy): if it never passes, nothing runs."""
    test = SERVICES["mosquitto"]["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        argv = ["sh", "-c", interpolate(test[1])]
        program = interpolate(test[1]).split()[0]
    else:
        assert test[0] == "CMD", test
        argv = [interpolate(arg) for arg in test[1:]]
        program = argv[0]
    if shutil.which(program) is None:
        missing_service(f"{program} not installed (apt-get install mosquitto-clients)")
    # In the container the command reaches localhost:1883; here the clients' own option files
    # point it at the test broker, so the command itself runs exactly as committed.
    options = tmp_path / "xdg"
    options.mkdir()
    for client in ("mosquitto_sub", "mosquitto_pub", "mosquitto_rr"):
        (options / client).write_text(f"-h 127.0.0.1\n-p {compose_broker.port}\n")
    env = {**os.environ, "XDG_CONFIG_HOME": str(options)}
    timeout = float(str(SERVICES["mosquitto"]["healthcheck"].get("timeout", "30s")).rstrip("s"))
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout + 5, check=False
    )
    assert result.returncode == 0, f"healthcheck failed ({result.returncode}): {result.stderr}"


def _identities() -> list[tuple[str, str]]:
    central = environment("central")
    lot_command = SERVICES["sim-lot"]["command"]
    lot_id = lot_command[lot_command.index("--lot") + 1]
    gateway_password = environment("sim-lot")["QRPARK_GATEWAY_PASSWORD"]
    return [
        (central["QRPARK_MQTT_USERNAME"], central["QRPARK_MQTT_PASSWORD"]),
        *((gateway_username(lot_id, gate), gateway_password) for gate in ("in1", "out1")),
    ]


@pytest.mark.parametrize(("user", "password"), _identities())
async def test_compose_mqtt_identities_sign_in_to_the_committed_broker(
    compose_broker: ComposeMosquitto, user: str, password: str
) -> None:
    for attempt, should_connect in ((password, True), (password + "-wrong", False)):
        client = MqttTransport(
            parse_broker_url(compose_broker.url), f"{user}-check", username=user, password=attempt
        )
        await client.start()
        try:
            assert await client.wait_connected(3 if should_connect else 1) is should_connect
        finally:
            await client.close()


# -- the whole stack --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(240)
def test_compose_stack_runs_and_the_simulated_lot_is_served(
    compose_broker: ComposeMosquitto, fresh_postgres_url: str, tmp_path: Path
) -> None:
    """central and sim-lot, with their compose commands and variables, serve real traffic."""
    http_port = free_port()
    volumes = tmp_path / "container"
    hosts = {
        f"mosquitto:{container_port('mosquitto')}": f"127.0.0.1:{compose_broker.port}",
        f"central:{container_port('central')}": f"127.0.0.1:{http_port}",
    }
    named_targets = [m.target for m in mounts("central") if not m.is_bind]

    def localize(value: str) -> str:
        for host, local in hosts.items():
            value = value.replace(host, local)
        for target in named_targets:
            if value.startswith(target):
                value = str(volumes) + value
        return value

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("QRPARK_")}

    def process_env(service: str) -> dict[str, str]:
        env = {name: localize(value) for name, value in environment(service).items()}
        if "QRPARK_DATABASE_URL" in env:
            env["QRPARK_DATABASE_URL"] = fresh_postgres_url
        return base_env | env

    def argv(service: str) -> list[str]:
        command = [localize(str(arg)) for arg in SERVICES[service]["command"]]
        command[0] = str(BIN / command[0])
        return command

    central_cmd = argv("central")
    central_cmd[central_cmd.index("--host") + 1] = "127.0.0.1"
    assert central_cmd[central_cmd.index("--port") + 1] == str(container_port("central"))
    central_cmd[central_cmd.index("--port") + 1] = str(http_port)
    workdir = tmp_path / "workdir"  # the image's WORKDIR
    workdir.mkdir()
    central_log = (tmp_path / "central.log").open("wb")
    central = subprocess.Popen(
        central_cmd,
        env=process_env("central"),
        cwd=workdir,
        stdout=central_log,
        stderr=subprocess.STDOUT,
    )
    try:
        lot_cmd = [*argv("sim-lot"), "--duration", "20", "--rate", "60", "--dwell", "1", "3"]
        lot = subprocess.run(
            lot_cmd,
            env=process_env("sim-lot"),
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        central.terminate()
        try:
            central.wait(15)
        except subprocess.TimeoutExpired:
            central.kill()
            central.wait(5)
        central_log.close()
    server_log = (tmp_path / "central.log").read_text(errors="replace")[-3000:]
    details = f"\n--- sim-lot ---\n{lot.stdout[-3000:]}{lot.stderr[-3000:]}\n--- central ---\n"
    assert lot.returncode == 0, details + server_log
    assert "entered: Welcome" in lot.stdout, details + server_log
    assert "left: Paid" in lot.stdout, details + server_log
    assert (volumes / named_targets[0].lstrip("/")).is_dir()
