"""Settings: QRPARK_* variables, defaults, and bad values failing with the field's name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.config import ServerSettings


def test_defaults_match_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QRPARK_DATABASE_URL", "QRPARK_MQTT_URL", "QRPARK_ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)

    settings = ServerSettings()

    assert settings.database_url == "sqlite:///./var/qrpark.db"
    assert settings.mqtt_url == "mqtt://127.0.0.1:1883"
    assert settings.mqtt_client_id == "qrpark-central"
    assert (settings.code_lifetime_s, settings.clock_skew_s, settings.command_ttl_s) == (60, 5, 10)
    assert settings.auto_migrate is True
    assert settings.mqtt_shared_group is None


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QRPARK_DATABASE_URL", "postgresql+psycopg://u@db/qrpark")
    monkeypatch.setenv("QRPARK_MQTT_SHARED_GROUP", "central")
    monkeypatch.setenv("QRPARK_COMMAND_TTL_S", "7")

    settings = ServerSettings()

    assert settings.database_url.startswith("postgresql")
    assert settings.mqtt_shared_group == "central"
    assert settings.command_ttl_s == 7


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("database_url", "mysql://x"),
        ("mqtt_url", "http://broker"),
        ("code_lifetime_s", 0),
        ("code_lifetime_s", 3600),
        ("command_ttl_s", 0),
        ("mqtt_shared_group", "bad group"),
        ("environment", "staging"),
    ],
)
def test_bad_values_fail_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        ServerSettings.model_validate({field: value})

    assert field in str(info.value)


def test_placeholder_mqtt_password_is_refused_in_production() -> None:
    with pytest.raises(ValidationError, match="mqtt_password"):
        ServerSettings(environment="production", mqtt_password="changeme")
    ServerSettings(environment="development", mqtt_password="changeme")


def test_cli_refuses_bad_settings_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    monkeypatch.setenv("QRPARK_CODE_LIFETIME_S", "0")

    assert main([]) == 2
    assert "code_lifetime_s" in capsys.readouterr().err
