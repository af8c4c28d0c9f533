"""Pricing: the pure tariff engine."""
