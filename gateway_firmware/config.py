"""Gateway settings: one TOML file per lane, overridable by ``QRPARK_GW_*`` environment variables.

A bad value fails at start with a :class:`ConfigError` that names the field (and its
environment variable), never later in the scan loop.

>>> # gateway.toml
>>> # lot_id = "lot1"
>>> # gate_id = "in1"
>>> # direction = "entry"
>>> # hardware = "real"
>>> # [public_keys]
>>> # k1 = "Jm8...43 base64url characters..."
>>> # QRPARK_GW_CAMERA__WIDTH=1280 qrpark-gateway --config gateway.toml

Environment names are ``QRPARK_GW_`` + the field name, nested with ``__``:
``QRPARK_GW_BROKER_URL``, ``QRPARK_GW_CAMERA__DEVICE``, ``QRPARK_GW_TIMEOUTS__OPEN_HOLD_S``,
``QRPARK_GW_OFFLINE__ENTRY``, ``QRPARK_GW_PUBLIC_KEYS='{"k1": "..."}'`` (JSON keeps the case
of key ids; ``QRPARK_GW_PUBLIC_KEYS__K1`` would be lower-cased), ``QRPARK_GW_TLS__CERT_FILE``.
"""

from __future__ import annotations

import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from parking_protocol.qr_token import load_public_key
from parking_protocol.types import Direction, GateId, LotId

__all__ = [
    "ENV_PREFIX",
    "CameraSettings",
    "ConfigError",
    "DecodeSettings",
    "DecoderBackend",
    "GatewaySettings",
    "GpioSettings",
    "HardwareKind",
    "OfflinePolicy",
    "TimeoutSettings",
    "TlsSettings",
    "load_settings",
    "pin_identity",
]

ENV_PREFIX = "QRPARK_GW_"
FIRMWARE_VERSION = "0.1.0"

DecoderBackend = Literal["auto", "zxing", "pyzbar", "opencv"]
HardwareKind = Literal["sim", "real"]
Pin = int | Annotated[str, StringConstraints(min_length=1, max_length=32)]
PositiveSeconds = Annotated[float, Field(gt=0, le=3600)]


class ConfigError(ValueError):
    """The gateway's configuration is unusable; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CameraSettings(_Section):
    """Which camera to open and how (``device`` is an index or a path/URL)."""

    # "auto": the Pi camera module through picamera2 when that library is installed and
    # device is 0, else OpenCV (USB/V4L2). Name one to insist on it.
    backend: Literal["auto", "opencv", "picamera2"] = "auto"
    device: int | str = 0
    width: Annotated[int, Field(ge=64, le=4096)] = 640
    height: Annotated[int, Field(ge=48, le=4096)] = 480
    fps: Annotated[float, Field(gt=0, le=120)] = 15.0


class DecodeSettings(_Section):
    """How frames are decoded so the pipeline keeps up with the camera on one core."""

    # Only look at this part of the frame: [x, y, width, height] in pixels.
    roi: tuple[int, int, int, int] | None = None
    # Try a copy scaled by this factor first, the full frame only when it finds nothing
    # (worth it for high-resolution cameras; off by default at 640x480).
    downscale: Annotated[float, Field(gt=0.05, lt=1.0)] | None = None
    # Skip decoding a frame identical to the last one that held no code (simulators; a
    # real sensor's noise makes every frame differ, so it costs nothing there).
    skip_unchanged: bool = True

    @field_validator("roi")
    @classmethod
    def _roi_positive(
        cls, value: tuple[int, int, int, int] | None
    ) -> tuple[int, int, int, int] | None:
        if value is not None:
            x, y, w, h = value
            if x < 0 or y < 0 or w < 21 or h < 21:
                raise ValueError("roi is [x, y, width, height]: x, y >= 0, width, height >= 21")
        return value


# The Pi's 40-pin header (J8, every model since the B+): physical pin -> BCM GPIO number.
_HEADER_GPIO = {
    3: 2, 5: 3, 7: 4, 8: 14, 10: 15, 11: 17, 12: 18, 13: 27, 15: 22, 16: 23, 18: 24, 19: 10,
    21: 9, 22: 25, 23: 11, 24: 8, 26: 7, 27: 0, 28: 1, 29: 5, 31: 6, 32: 12, 33: 13, 35: 19,
    36: 16, 37: 26, 38: 20, 40: 21,
}  # fmt: skip


def pin_identity(pin: int | str) -> str:
    """One name per physical pin, so two spellings of the same pin compare equal.

    >>> [pin_identity(p) for p in (17, "17", "GPIO17", "bcm17", "BOARD11", "J8:11")]
    ['GPIO17', 'GPIO17', 'GPIO17', 'GPIO17', 'GPIO17', 'GPIO17']

    Other gpiozero names (``WPI0``...) are compared as written.
    """
    if isinstance(pin, int):
        return f"GPIO{pin}"
    text = pin.strip().upper()
    if text.isdigit():
        return f"GPIO{int(text)}"
    for prefix in ("GPIO", "BCM", "BOARD", "J8:"):
        number = text.removeprefix(prefix)
        if number != text and number.isdigit():
            if prefix in ("GPIO", "BCM"):
                return f"GPIO{int(number)}"
            gpio = _HEADER_GPIO.get(int(number))
            return f"GPIO{gpio}" if gpio is not None else f"BOARD{int(number)}"
    return text


class GpioSettings(_Section):
    """BCM pin numbers (or gpiozero pin names) of the relay, LEDs and presence loop.

    Every device needs a pin of its own: two fields naming the same pin (``17`` and
    ``"BOARD11"`` are one pin) are a configuration error naming both fields.
    """

    relay_pin: Pin = 17
    relay_active_high: bool = True
    green_led_pin: Pin | None = None
    red_led_pin: Pin | None = None
    # An active buzzer: one beep when a code is accepted, two when refused.
    buzzer_pin: Pin | None = None
    # The vehicle detector's dry contact (induction loop / beam); None: no detector.
    presence_pin: Pin | None = None
    # True: a dry contact closing to ground (vehicle = pin low); False: vehicle = pin high.
    presence_pull_up: bool = True

    @model_validator(mode="after")
    def _one_device_per_pin(self) -> Self:
        owners: dict[str, str] = {}
        clashes: list[str] = []
        for name in ("relay_pin", "green_led_pin", "red_led_pin", "buzzer_pin", "presence_pin"):
            pin: int | str | None = getattr(self, name)
            if pin is None:
                continue
            identity = pin_identity(pin)
            if identity in owners:
                clashes.append(f"{owners[identity]} and {name} are both {identity}")
            else:
                owners[identity] = name
        if clashes:
            raise ValueError("; ".join(clashes) + " (each device needs a pin of its own)")
        return self


class TimeoutSettings(_Section):
    """How long the lane waits for things."""

    # The central service must answer a scan within this, else the gateway decides offline.
    decision_timeout_s: PositiveSeconds = 3.0
    # With a detector: close this long after opening if no vehicle came. Without one: close
    # this long after opening, always.
    open_hold_s: PositiveSeconds = 8.0
    # The same code text seen again within this window is the same scan.
    debounce_s: PositiveSeconds = 5.0


class OfflinePolicy(_Section):
    """What a lane does when the central service cannot answer in time.

    ``entry = "allow_valid"`` opens for a code that verifies locally (signature, validity
    window, not used before, account not deny-listed); ``exit = "allow"`` does the same on
    the way out (a valid code is needed, but nobody is trapped waiting for payment).
    ``"deny"`` keeps the barrier closed and asks the driver to call the operator.
    """

    entry: Literal["allow_valid", "deny"] = "allow_valid"
    exit: Literal["allow", "deny"] = "allow"

    def allows(self, direction: Direction) -> bool:
        if direction is Direction.ENTRY:
            return self.entry == "allow_valid"
        return self.exit == "allow"


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


def _certificate_common_name(path: Path) -> str | None:
    """The subject CN of the first certificate in the PEM file ``path`` (None: no CN)."""
    names = x509.load_pem_x509_certificate(path.read_bytes()).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME
    )
    return str(names[0].value) if names else None


class TlsSettings(_Section):
    """Certificates for an ``mqtts://`` broker, all PEM files (checked at start: they must
    exist and load).

    ``ca_file`` is the CA that signed the broker's certificate (None: the system's trust
    store). ``cert_file`` and ``key_file`` are this gateway's client certificate and its
    unencrypted private key (keep it mode 0600): a broker with ``use_identity_as_username``
    takes the certificate's CN, ``gw-<lot>-<gate>``, as the MQTT user its ACL is keyed by.

    >>> # [tls]
    >>> # ca_file = "/etc/qrpark/tls/ca.crt"
    >>> # cert_file = "/etc/qrpark/tls/gw-p1-in1.crt"
    >>> # key_file = "/etc/qrpark/tls/gw-p1-in1.key"
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def configured(self) -> bool:
        return any(f is not None for f in (self.ca_file, self.cert_file, self.key_file))

    @field_validator("ca_file")
    @classmethod
    def _ca_loads(cls, value: Path | None) -> Path | None:
        if value is not None:
            _read_file(value)
            try:
                ssl.create_default_context(cafile=value)
            except ssl.SSLError as exc:
                raise ValueError(f"{value} is not a PEM CA certificate: {exc.reason}") from None
        return value

    @field_validator("cert_file")
    @classmethod
    def _cert_loads(cls, value: Path | None) -> Path | None:
        if value is not None:
            data = _read_file(value)
            try:
                x509.load_pem_x509_certificate(data)
            except ValueError:
                raise ValueError(f"{value} is not a PEM certificate") from None
        return value

    @field_validator("key_file")
    @classmethod
    def _key_loads(cls, value: Path | None) -> Path | None:
        if value is not None:
            data = _read_file(value)
            try:
                load_pem_private_key(data, password=None)
            except TypeError:
                raise ValueError(
                    f"{value} is encrypted; the gateway needs it unencrypted"
                ) from None
            except ValueError:
                raise ValueError(f"{value} is not a PEM private key") from None
        return value

    @model_validator(mode="after")
    def _cert_and_key_pair(self) -> Self:
        cert, key = self.cert_file, self.key_file
        if (cert is None) != (key is None):
            missing = "key_file" if key is None else "cert_file"
            raise ValueError(f"cert_file and key_file go together: {missing} is missing")
        if cert is not None and key is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
            except ssl.SSLError as exc:
                raise ValueError(
                    f"key_file {key} is not the key of cert_file {cert} ({exc.reason})"
                ) from None
        return self


class GatewaySettings(BaseSettings):
    """Everything one lane controller needs; built at start by :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    lot_id: LotId
    gate_id: GateId
    direction: Direction
    # "sim" or "real": chosen explicitly, never a silent fallback when hardware is missing.
    hardware: HardwareKind
    broker_url: str = "mqtt://127.0.0.1:1883"
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    # mqtts:// only: the broker's CA, and this gateway's client certificate and key.
    tls: TlsSettings = TlsSettings()
    # key id -> Ed25519 public key (43 base64url characters or a PEM block).
    public_keys: dict[str, str]
    camera: CameraSettings = CameraSettings()
    decoder: DecoderBackend = "auto"
    decode: DecodeSettings = DecodeSettings()
    gpio: GpioSettings = GpioSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    offline: OfflinePolicy = OfflinePolicy()
    # Ignore codes unless the detector reports a vehicle (needs gpio.presence_pin).
    scan_only_when_present: bool = False
    heartbeat_s: PositiveSeconds = 30.0
    # Reconnect backoff to the broker is capped at this (jittered exponential from 0.2 s).
    reconnect_max_s: Annotated[float, Field(ge=0.05, le=300)] = 10.0
    nonce_cache_size: Annotated[int, Field(ge=16, le=1_000_000)] = 10_000
    # Default: ./var/gateway-<lot>-<gate>.db
    outbox_path: Path | None = None
    firmware_version: Annotated[str, StringConstraints(max_length=64)] = FIRMWARE_VERSION
    # Where the driver's text goes besides the log: a file a display program shows (the
    # current text, replaced atomically), e.g. /run/qrpark/display.txt.
    display_file: Path | None = None
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("public_keys")
    @classmethod
    def _keys_load(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one public key is needed to verify codes offline")
        for kid, text in value.items():
            try:
                load_public_key(text)
            except ValueError as exc:
                raise ValueError(f"key {kid!r}: {exc}") from None
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url_parses(cls, value: str) -> str:
        parts = urlsplit(value if "://" in value else f"mqtt://{value}")
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"unsupported scheme {parts.scheme!r} (use mqtt:// or mqtts://)")
        if not parts.hostname:
            raise ValueError("no host")
        _ = parts.port  # raises ValueError for a bad port
        return value

    @model_validator(mode="after")
    def _tls_fits_the_broker(self) -> Self:
        tls = self.tls
        if tls.configured and not self.broker_tls:
            raise ValueError(
                f"tls: certificate files are set but broker_url {self.broker_url!r} is not "
                "mqtts:// (they would not be used)"
            )
        if tls.cert_file is not None:
            user = self.mqtt_username or self.client_id
            name = _certificate_common_name(tls.cert_file)
            if name != user:
                raise ValueError(
                    f"tls.cert_file: the certificate is for {name!r}, this gateway is {user!r} "
                    "(the broker takes the certificate's CN as the MQTT user)"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments > environment > the TOML file.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    # -- derived values --------------------------------------------------------------------
    @property
    def outbox_file(self) -> Path:
        if self.outbox_path is not None:
            return self.outbox_path
        return Path("var") / f"gateway-{self.lot_id}-{self.gate_id}.db"

    @property
    def broker_tls(self) -> bool:
        """Whether ``broker_url`` asks for TLS (mqtts:// or ssl://)."""
        url = self.broker_url
        return urlsplit(url if "://" in url else f"mqtt://{url}").scheme in ("mqtts", "ssl")

    @property
    def client_id(self) -> str:
        return f"gw-{self.lot_id}-{self.gate_id}"

    @property
    def has_presence_detector(self) -> bool:
        return self.gpio.presence_pin is not None

    def verification_keys(self) -> dict[str, Ed25519PublicKey]:
        return {kid: load_public_key(text) for kid, text in self.public_keys.items()}


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in error.get("loc", ())]
        field = ".".join(loc) or "settings"
        env = ENV_PREFIX + "__".join(loc[:2]).upper() if loc else ""
        hint = f" (env {env})" if env else ""
        lines.append(f"{field}: {error['msg']}{hint}")
    return "invalid gateway configuration: " + "; ".join(lines)


def load_settings(path: str | Path | None, **overrides: Any) -> GatewaySettings:
    """Read ``path`` (TOML), apply ``QRPARK_GW_*`` overrides, then ``overrides``; validate.

    Raises :class:`ConfigError` naming the file or the field on any problem.
    """
    toml_path: Path | None = None
    if path is not None:
        toml_path = Path(path)
        if not toml_path.is_file():
            raise ConfigError(f"config file {toml_path} does not exist")

    class _FromFile(GatewaySettings):
        model_config = SettingsConfigDict(toml_file=toml_path)

    _FromFile.__name__ = _FromFile.__qualname__ = "GatewaySettings"
    try:
        return _FromFile(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {toml_path} is not valid TOML: {exc}") from None
