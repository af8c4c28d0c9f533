from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway_firmware.app import make_transport, tls_context
from gateway_firmware.config import ConfigError, GatewaySettings, load_settings, pin_identity
from parking_protocol.clock import FakeClock
from parking_protocol.mqtt import MqttTransport
from parking_protocol.qr_token import public_key_text
from parking_protocol.types import Direction
from qrpark.broker import GatewayIdentity, write_tls

EXAMPLE = Path(__file__).resolve().parents[2] / "gateway_firmware" / "gateway.example.toml"


@pytest.fixture
def key_text(signing_key: Ed25519PrivateKey) -> str:
    return public_key_text(signing_key.public_key())


@pytest.fixture
def write_config(tmp_path: Path, key_text: str) -> Callable[..., Path]:
    def _write(extra: str = "", *, keys: str | None = None) -> Path:
        path = tmp_path / "gateway.toml"
        path.write_text(
            'lot_id = "lot1"\n'
            'gate_id = "out1"\n'
            'direction = "exit"\n'
            'hardware = "sim"\n'
            f"{extra}\n"
            "[public_keys]\n"
            f"{keys if keys is not None else f'k1 = {key_text!r}'}\n".replace("'", '"')
        )
        return path

    return _write


def test_loads_toml_with_defaults(write_config: Callable[..., Path]) -> None:
    settings = load_settings(write_config())
    assert (settings.lot_id, settings.gate_id, settings.direction) == ("lot1", "out1", "exit")
    assert settings.direction is Direction.EXIT
    assert settings.broker_url == "mqtt://127.0.0.1:1883"
    assert (settings.camera.width, settings.camera.height, settings.camera.fps) == (640, 480, 15)
    assert settings.timeouts.decision_timeout_s == 3.0
    assert settings.timeouts.debounce_s == 5.0
    assert settings.decoder == "auto"
    assert settings.offline.allows(Direction.EXIT)
    assert settings.outbox_file == Path("var/gateway-lot1-out1.db")
    assert set(settings.verification_keys()) == {"k1"}


def test_environment_overrides_the_file(
    write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config("[camera]\nwidth = 1280\nheight = 720\n")
    monkeypatch.setenv("QRPARK_GW_BROKER_URL", "mqtts://broker.example:8883")
    monkeypatch.setenv("QRPARK_GW_CAMERA__WIDTH", "320")
    monkeypatch.setenv("QRPARK_GW_TIMEOUTS__OPEN_HOLD_S", "12.5")
    monkeypatch.setenv("QRPARK_GW_MQTT_PASSWORD", "s3cret")
    settings = load_settings(path)
    assert settings.broker_url == "mqtts://broker.example:8883"
    assert (settings.camera.width, settings.camera.height) == (320, 720)  # merged, not replaced
    assert settings.timeouts.open_hold_s == 12.5
    assert settings.mqtt_password is not None
    assert settings.mqtt_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_explicit_overrides_win(write_config: Callable[..., Path]) -> None:
    assert load_settings(write_config(), hardware="real").hardware == "real"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ('[camera]\nwidth = "wide"', "camera.width"),
        ('[offline]\nentry = "maybe"', "offline.entry"),
        ('decoder = "tesseract"', "decoder"),
        ('broker_url = "http://x:1883"', "broker_url"),
        ("[timeouts]\ndecision_timeout_s = -1", "timeouts.decision_timeout_s"),
        ("camra = 1", "camra"),
    ],
)
def test_bad_field_is_named_in_the_error(
    write_config: Callable[..., Path], extra: str, field: str
) -> None:
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        load_settings(write_config(extra))


def test_bad_public_key_is_refused_at_start(write_config: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError, match=r"public_keys.*'k1'"):
        load_settings(write_config(keys='k1 = "not-a-key"'))
    with pytest.raises(ConfigError, match="public_keys"):
        load_settings(write_config(keys=""))


def test_hardware_must_be_chosen(tmp_path: Path, key_text: str) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        f'lot_id = "l"\ngate_id = "g"\ndirection = "entry"\n[public_keys]\nk1 = "{key_text}"\n'
    )
    with pytest.raises(ConfigError, match="hardware"):
        load_settings(path)


def test_missing_file_and_bad_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("lot_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_example_config_loads_once_a_real_key_is_given(
    key_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shipped placeholder key is refused, so nobody runs the example by accident...
    with pytest.raises(ConfigError, match="public_keys"):
        load_settings(EXAMPLE)
    # ...and with a real key from the environment the example is a valid config.
    monkeypatch.setenv("QRPARK_GW_PUBLIC_KEYS", f'{{"k1": "{key_text}"}}')
    settings = load_settings(EXAMPLE)
    assert isinstance(settings, GatewaySettings)
    assert settings.gpio.relay_pin == 17


@pytest.mark.parametrize(
    ("gpio", "clash"),
    [
        ("relay_pin = 17\npresence_pin = 17", "relay_pin and presence_pin are both GPIO17"),
        ('relay_pin = 17\nbuzzer_pin = "GPIO17"', "relay_pin and buzzer_pin are both GPIO17"),
        ('green_led_pin = "BCM22"\nred_led_pin = 22', "green_led_pin and red_led_pin"),
        ('presence_pin = "BOARD16"\nbuzzer_pin = 23', "buzzer_pin and presence_pin"),
        ('relay_pin = "J8:11"\npresence_pin = 17', "relay_pin and presence_pin are both GPIO17"),
        ("buzzer_pin = 0\nred_led_pin = 0", "red_led_pin and buzzer_pin are both GPIO0"),
    ],
)
def test_two_devices_on_one_pin_are_refused_naming_both_fields(
    write_config: Callable[..., Path], gpio: str, clash: str
) -> None:
    with pytest.raises(ConfigError, match=rf"gpio: .*{clash}"):
        load_settings(write_config(f"[gpio]\n{gpio}"))


def test_distinct_pins_are_fine(write_config: Callable[..., Path]) -> None:
    settings = load_settings(
        write_config(
            "[gpio]\nrelay_pin = 17\ngreen_led_pin = 22\nred_led_pin = 27\n"
            'buzzer_pin = "BOARD29"\npresence_pin = 23'
        )
    )
    assert settings.gpio.buzzer_pin == "BOARD29"


def test_pin_identity_agrees_with_gpiozero_on_every_header_pin() -> None:
    """Our table of the 40-pin header against gpiozero's own board data."""
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    try:
        header = factory.board_info.headers["J8"]
        for number, info in header.pins.items():
            names = {name for name in info.names if not str(name).startswith("WPI")}
            expected = info.name if info.name.startswith("GPIO") else f"BOARD{number}"
            if not info.name.startswith("GPIO"):
                names = {f"BOARD{number}", f"J8:{number}"}
            assert {pin_identity(name) for name in names} == {expected}, info
    finally:
        factory.close()


# -- TLS with a client certificate -----------------------------------------------------------
TLS_URL = 'broker_url = "mqtts://127.0.0.1:8883"'


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    """A CA, a broker certificate and client certificates for lot1/out1 and lot1/in1."""
    directory = tmp_path / "tls"
    write_tls(directory, [GatewayIdentity("lot1", "out1"), GatewayIdentity("lot1", "in1")])
    (directory / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    return directory


def tls_table(tls_dir: Path, **files: str | None) -> str:
    """A [tls] table for gateway lot1/out1; ``files`` replace (or with None drop) entries."""
    entries: dict[str, str | None] = {
        "ca_file": "ca.crt",
        "cert_file": "gw-lot1-out1.crt",
        "key_file": "gw-lot1-out1.key",
    }
    entries.update(files)
    lines = [f'{k} = "{tls_dir / v}"' for k, v in entries.items() if v is not None]
    return "[tls]\n" + "\n".join(lines)


def test_tls_files_are_loaded_into_the_transports_context(
    write_config: Callable[..., Path], tls_dir: Path
) -> None:
    settings = load_settings(write_config(f"{TLS_URL}\n{tls_table(tls_dir)}"))
    assert settings.tls.cert_file == tls_dir / "gw-lot1-out1.crt"
    context = tls_context(settings)
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "qrpark broker CA"),),)
    ]
    transport = make_transport(settings, boot=1, clock=FakeClock())
    assert isinstance(transport, MqttTransport)
    # Without TLS there is no context; mqtts:// alone uses the system's trust store.
    assert tls_context(load_settings(write_config())) is None
    plain_tls = tls_context(load_settings(write_config(TLS_URL)))
    assert plain_tls is not None
    assert plain_tls.verify_mode is ssl.CERT_REQUIRED


def test_tls_files_can_come_from_the_environment(
    write_config: Callable[..., Path], tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QRPARK_GW_BROKER_URL", "mqtts://broker.example:8883")
    monkeypatch.setenv("QRPARK_GW_TLS__CA_FILE", str(tls_dir / "ca.crt"))
    monkeypatch.setenv("QRPARK_GW_TLS__CERT_FILE", str(tls_dir / "gw-lot1-out1.crt"))
    monkeypatch.setenv("QRPARK_GW_TLS__KEY_FILE", str(tls_dir / "gw-lot1-out1.key"))
    settings = load_settings(write_config())
    assert settings.tls.key_file == tls_dir / "gw-lot1-out1.key"


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"ca_file": "missing.crt"}, r"tls\.ca_file: .*missing\.crt does not exist"),
        ({"ca_file": "gw-lot1-out1.key"}, r"tls\.ca_file: .*not a PEM CA certificate"),
        ({"ca_file": "."}, r"tls\.ca_file: .*is a directory"),
        ({"cert_file": "garbage.pem"}, r"tls\.cert_file: .*not a PEM certificate"),
        ({"key_file": "missing.key"}, r"tls\.key_file: .*does not exist"),
        ({"key_file": "ca.crt"}, r"tls\.key_file: .*not a PEM private key"),
        ({"key_file": "gw-lot1-in1.key"}, r"tls: .*is not the key of cert_file"),
        ({"key_file": None}, r"tls: .*cert_file and key_file go together: key_file is missing"),
        (
            {"cert_file": "gw-lot1-in1.crt", "key_file": "gw-lot1-in1.key"},
            r"tls\.cert_file: the certificate is for 'gw-lot1-in1', this gateway is "
            r"'gw-lot1-out1'",
        ),
    ],
)
def test_bad_tls_files_are_refused_at_start_naming_the_field(
    write_config: Callable[..., Path], tls_dir: Path, files: dict[str, str | None], error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        load_settings(write_config(f"{TLS_URL}\n{tls_table(tls_dir, **files)}"))


def test_an_encrypted_client_key_is_refused(
    write_config: Callable[..., Path], tls_dir: Path
) -> None:
    key = serialization.load_pem_private_key((tls_dir / "gw-lot1-out1.key").read_bytes(), None)
    (tls_dir / "locked.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match=r"tls\.key_file: .*encrypted"):
        load_settings(write_config(f"{TLS_URL}\n{tls_table(tls_dir, key_file='locked.key')}"))


def test_tls_files_with_a_plain_mqtt_url_are_refused(
    write_config: Callable[..., Path], tls_dir: Path
) -> None:
    """They would silently not be used: the gateway would send its password in clear."""
    with pytest.raises(ConfigError, match=r"broker_url 'mqtt://127\.0\.0\.1:1883' is not mqtts"):
        load_settings(write_config(tls_table(tls_dir)))
