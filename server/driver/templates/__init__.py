"""Package marker so the files here ship in wheels (package-data)."""
