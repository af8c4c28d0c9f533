"""Settings of the central service: one class, read from ``QRPARK_*`` variables, passed in.

Nothing here is built at import time; :class:`ServerSettings` is instantiated by the
composition root (``server.main.create_app`` / ``server.cli``), and a bad value fails there
with the field's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from parking_protocol.mqtt import parse_broker_url
from parking_protocol.qr_token import MAX_LIFETIME

__all__ = ["ServerSettings"]

_PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "password", "secret", "qrpark"})


class ServerSettings(BaseSettings):
    """Everything the central service needs to start (env prefix ``QRPARK_``)."""

    model_config = SettingsConfigDict(env_prefix="QRPARK_", extra="ignore", frozen=True)

    environment: Literal["development", "production"] = "development"
    database_url: str = "sqlite:///./var/qrpark.db"
    auto_migrate: bool = True

    mqtt_enabled: bool = True
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_client_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "qrpark-central"
    mqtt_shared_group: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,36}$")] | None = None

    key_file: Path = Path("./var/keys/signing.pem")
    code_lifetime_s: Annotated[int, Field(ge=5, le=int(MAX_LIFETIME.total_seconds()))] = 60
    clock_skew_s: Annotated[int, Field(ge=0, le=120)] = 5
    command_ttl_s: Annotated[int, Field(ge=1, le=300)] = 10
    max_batch: Annotated[int, Field(ge=1, le=10_000)] = 200
    # Online entries and wallet exits decided with batched statements (server/sessions/
    # fastpath.py), about 20x faster; false sends every event through the ORM flow.
    event_fast_path: bool = True

    # Operator panel and driver page (server.auth / server.panel / server.driver).
    admin_username: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")] = "admin"
    admin_password: SecretStr | None = None  # creates the first admin when no user exists
    session_hours: Annotated[int, Field(ge=1, le=24 * 30)] = 12
    demo_driver_pin: SecretStr | None = None  # development only: PIN of accounts without one

    # REST API (server.auth.api): the first admin token, and the per-account code issuing limit.
    bootstrap_api_token: SecretStr | None = None  # registered as an admin token at start
    code_rate_per_minute: Annotated[int, Field(ge=1, le=6000)] = 30
    code_burst: Annotated[int, Field(ge=1, le=1000)] = 10
    # How stale a polled read (lot occupancy, gate status) or a token lookup may be when
    # ANOTHER service process made the change (this process's own changes show at once).
    api_read_cache_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    api_token_cache_s: Annotated[float, Field(ge=0, le=300)] = 5.0

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql")):
            raise ValueError("use sqlite:///path.db or postgresql+psycopg://user@host/db")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parse_broker_url(value)  # raises ValueError naming the problem
        return value

    @model_validator(mode="after")
    def _no_placeholder_secrets_in_production(self) -> ServerSettings:
        if (
            self.environment == "production"
            and self.mqtt_password is not None
            and self.mqtt_password.get_secret_value().lower() in _PLACEHOLDER_SECRETS
        ):
            raise ValueError("mqtt_password is a placeholder; set a real secret in production")
        return self

    @model_validator(mode="after")
    def _panel_secrets(self) -> ServerSettings:
        if self.environment != "production":
            return self
        password = self.admin_password.get_secret_value() if self.admin_password else None
        if password is not None and (
            password.lower() in _PLACEHOLDER_SECRETS | {"admin", "demo"} or len(password) < 10
        ):
            raise ValueError(
                "admin_password is a placeholder or shorter than 10 characters; "
                "set a real secret in production"
            )
        if self.demo_driver_pin is not None:
            raise ValueError("demo_driver_pin is for development only; unset it in production")
        token = self.bootstrap_api_token.get_secret_value() if self.bootstrap_api_token else None
        if token is not None and (
            len(token) < 24
            or token.lower() in _PLACEHOLDER_SECRETS
            or any(word in token.lower() for word in ("changeme", "change-me", "placeholder"))
        ):
            raise ValueError(
                "bootstrap_api_token is a placeholder or shorter than 24 characters; "
                "set a real secret in production (e.g. python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')"
            )
        return self
