#!/usr/bin/env bash
# Installs the Debian packages the test suite needs (ClickHouse, docker-compose, Chromium, ZooKeeper), only when missing (idempotent, quiet).
# Called by `make test`; needs root or sudo and the package registry.
set -euo pipefail
need=()
command -v clickhouse-server >/dev/null 2>&1 || need+=(clickhouse-server)
command -v clickhouse-client >/dev/null 2>&1 || need+=(clickhouse-client)
command -v docker-compose   >/dev/null 2>&1 || need+=(docker-compose)
command -v chromium         >/dev/null 2>&1 || need+=(chromium)
[ -x /usr/share/zookeeper/bin/zkServer.sh ] || need+=(zookeeper)   # replicated-table tests
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
