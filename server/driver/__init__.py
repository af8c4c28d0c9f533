"""The driver's page: the live QR code, balance and a countdown (no external assets)."""
