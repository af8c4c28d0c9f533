from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway_firmware.config import ConfigError, GatewaySettings, load_settings, pin_identity
from parking_protocol.qr_token import public_key_text
from parking_protocol.types import Direction

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
