"""The MQTT side of the central service."""
