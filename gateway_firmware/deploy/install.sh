#!/usr/bin/env bash
# Install the qrpark gateway on a Raspberry Pi (Raspberry Pi OS / Debian), as root:
#   sudo ./install.sh                  # latest qrpark[gateway] from the package index
#   sudo QRPARK_SPEC=/tmp/qrpark-0.1.0-py3-none-any.whl ./install.sh
set -euo pipefail

PREFIX=/opt/qrpark
CONF_DIR=/etc/qrpark
STATE_DIR=/var/lib/qrpark
SPEC="${QRPARK_SPEC:-qrpark}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ $EUID -ne 0 ]]; then
    echo "install.sh: run as root (sudo)" >&2
    exit 1
fi

# libzbar0 for the pyzbar decoder; python3-venv for the virtual environment.
apt-get install -y --no-install-recommends python3-venv libzbar0

id -u qrpark >/dev/null 2>&1 || useradd --system --home-dir "$STATE_DIR" --shell /usr/sbin/nologin qrpark
for group in gpio video; do
    getent group "$group" >/dev/null && usermod -aG "$group" qrpark
done

install -d -o qrpark -g qrpark -m 0750 "$STATE_DIR"
install -d -m 0755 "$CONF_DIR" "$PREFIX"

python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --upgrade pip
"$PREFIX/venv/bin/pip" install "${SPEC}[gateway]"

if [[ ! -e "$CONF_DIR/gateway.toml" ]]; then
    install -m 0640 -g qrpark "$HERE/../gateway.example.toml" "$CONF_DIR/gateway.toml"
    echo "install.sh: edit $CONF_DIR/gateway.toml (lot_id, gate_id, public_keys, broker_url)"
fi
if [[ ! -e "$CONF_DIR/gateway.env" ]]; then
    install -m 0640 -g qrpark /dev/null "$CONF_DIR/gateway.env"
fi

install -m 0644 "$HERE/qrpark-gateway.service" /etc/systemd/system/qrpark-gateway.service
systemctl daemon-reload
systemctl enable qrpark-gateway.service
echo "install.sh: done; start with: systemctl start qrpark-gateway"
