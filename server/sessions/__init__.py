"""Parking sessions and the scan-event use case that opens and closes them."""
