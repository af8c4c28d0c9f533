"""``python -m gateway_firmware --config gateway.toml``."""

from gateway_firmware.cli import main

raise SystemExit(main())
