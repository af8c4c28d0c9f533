# One image for the central service and the simulated lot (docker-compose.yml).
# Bookworm, named: the bare tag moved to trixie, which renamed libzbar0/libglib2.0-0 (t64).
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libzbar0 libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY parking_protocol ./parking_protocol
COPY server ./server
COPY gateway_firmware ./gateway_firmware
COPY sim_devices ./sim_devices
COPY qrpark ./qrpark
RUN pip install --no-cache-dir '.[all]'
# The compose volume central-keys is mounted at /var/lib/qrpark/keys: Docker gives a new named
# volume the owner of the image's directory, so it must exist here and belong to qrpark, or
# the service cannot write its signing key.
RUN useradd --system --create-home qrpark \
 && mkdir -p /var/lib/qrpark/keys \
 && chown -R qrpark /var/lib/qrpark \
 && chmod 700 /var/lib/qrpark/keys
USER qrpark
WORKDIR /var/lib/qrpark
EXPOSE 8000
CMD ["qrpark", "server", "--host", "0.0.0.0", "--port", "8000"]
