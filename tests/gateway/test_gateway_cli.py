from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import gateway_firmware
from gateway_firmware.cli import JsonFormatter, main
from gateway_firmware.config import GatewaySettings
from parking_protocol.messages import GatewayState, GatewayStatus, decode
from parking_protocol.topics import TopicKind, gate_topic
from qrpark.services import MosquittoProcess


def test_bad_config_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "g.toml"
    path.write_text('lot_id = "lot1"\ngate_id = "in1"\ndirection = "sideways"\nhardware = "sim"\n')
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "direction" in err
    assert "public_keys" in err


def test_two_devices_on_one_pin_exit_2_naming_both_fields(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_settings: Callable[..., GatewaySettings],
) -> None:
    """A pin clash is a bad config (status 2: systemd does not restart it), caught before
    gpiozero would fail on it (status 1, restarted forever)."""
    key = make_settings().public_keys["k1"]
    path = tmp_path / "g.toml"
    path.write_text(
        'lot_id = "lot1"\ngate_id = "in1"\ndirection = "entry"\nhardware = "sim"\n'
        f'outbox_path = "{tmp_path / "o.db"}"\n'
        '[gpio]\nrelay_pin = 17\npresence_pin = "BOARD11"\n'
        f'[public_keys]\nk1 = "{key}"\n'
    )
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "gpio" in err
    assert "relay_pin and presence_pin are both GPIO17" in err
    assert not (tmp_path / "o.db").exists()  # refused before anything started


def test_a_missing_client_certificate_exits_2_naming_the_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_settings: Callable[..., GatewaySettings],
) -> None:
    key = make_settings().public_keys["k1"]
    path = tmp_path / "g.toml"
    path.write_text(
        'lot_id = "lot1"\ngate_id = "in1"\ndirection = "entry"\nhardware = "sim"\n'
        'broker_url = "mqtts://broker.example:8883"\n'
        f'outbox_path = "{tmp_path / "o.db"}"\n'
        f'[tls]\ncert_file = "{tmp_path / "gw.crt"}"\nkey_file = "{tmp_path / "gw.key"}"\n'
        f'[public_keys]\nk1 = "{key}"\n'
    )
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tls.cert_file" in err
    assert "QRPARK_GW_TLS__CERT_FILE" in err
    assert not (tmp_path / "o.db").exists()


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_hardware_flag_is_validated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--config", "x.toml", "--hardware", "fake"])
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway_firmware", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "--hardware" in result.stdout


def test_json_log_lines() -> None:
    record = logging.LogRecord("gateway_firmware", logging.WARNING, __file__, 1, "x=%s", (1,), None)
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["level"], entry["logger"], entry["msg"]) == ("warning", "gateway_firmware", "x=1")
    assert entry["ts"].endswith("+00:00")


def test_public_api_is_explicit() -> None:
    for name in gateway_firmware.__all__:
        assert hasattr(gateway_firmware, name), name
    assert sorted(gateway_firmware.__all__) == gateway_firmware.__all__


def test_firmware_does_not_import_the_server_or_simulator() -> None:
    code = (
        "import sys, gateway_firmware, gateway_firmware.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('server', 'sim_devices', 'fastapi', 'sqlalchemy', 'sqlmodel', 'cv2', 'gpiozero')]; "
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.broker
async def test_cli_goes_online_and_offline_cleanly_on_sigterm(
    mosquitto: MosquittoProcess, tmp_path: Path, make_settings: Callable[..., GatewaySettings]
) -> None:
    from parking_protocol.mqtt import MqttTransport, parse_broker_url

    settings = make_settings()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'lot_id = "clitest"\ngate_id = "in1"\ndirection = "entry"\nhardware = "sim"\n'
        f'broker_url = "{mosquitto.url}"\noutbox_path = "{tmp_path / "o.db"}"\n'
        f'[public_keys]\nk1 = "{settings.public_keys["k1"]}"\n'
    )
    watcher = MqttTransport(parse_broker_url(mosquitto.url), "watcher")
    await watcher.start()
    assert await watcher.wait_connected(5)
    await watcher.subscribe(gate_topic("clitest", "in1", TopicKind.STATUS))
    messages = watcher.messages()

    async def next_state() -> GatewayStatus:
        raw = await asyncio.wait_for(anext(messages), 10)
        return decode(raw.payload, GatewayStatus)

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway_firmware",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        online = await next_state()
        assert (online.state, online.boot) == (GatewayState.ONLINE, 1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        offline = await next_state()
        assert (offline.state, offline.boot) == (GatewayState.OFFLINE, 1)

        # A crash (no clean goodbye): the broker publishes the last will for the new boot.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway_firmware",
            "--config",
            str(config),
            stderr=asyncio.subprocess.PIPE,
        )
        online = await next_state()
        assert (online.state, online.boot) == (GatewayState.ONLINE, 2)
        proc.kill()
        await proc.wait()
        will = await next_state()
        assert (will.state, will.boot) == (GatewayState.OFFLINE, 2)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await watcher.close()
