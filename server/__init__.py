"""qrpark's central service: FastAPI + SQLModel, and the MQTT bridge to the gateways.

Entry points: :func:`server.main.create_app`, :func:`server.central.build_central`,
:func:`server.cli.serve` and :class:`server.config.ServerSettings`. Importing this package
builds nothing.
"""
