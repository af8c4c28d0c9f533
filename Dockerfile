# One image for the central service and the simulated lot (docker-compose.yml).
FROM python:3.11-slim
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
RUN useradd --system --create-home qrpark && mkdir -p /var/lib/qrpark && chown qrpark /var/lib/qrpark
USER qrpark
WORKDIR /var/lib/qrpark
EXPOSE 8000
CMD ["qrpark", "server", "--host", "0.0.0.0", "--port", "8000"]
