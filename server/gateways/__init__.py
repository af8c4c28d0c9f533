"""Gates, their gateways' latest status and their replies to commands."""
