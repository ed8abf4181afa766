#!/usr/bin/env bash
# Make sure a Docker engine is reachable, installing/starting one if needed.
# Idempotent: quiet no-op when `docker info` already works. Meant for dev
# boxes and CI sandboxes without systemd, so dockerd is started by hand.
set -euo pipefail

LOG=${FORGE_DOCKERD_LOG:-/tmp/forge-dockerd.log}
TIMEOUT=${FORGE_DOCKERD_TIMEOUT:-60}

log() { echo "ensure-docker: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

docker_ok() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

docker_ok && exit 0

# Installing packages and running a daemon both need root; use sudo when it
# is available rather than failing outright.
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "docker is not reachable and we are not root (no sudo)"
  SUDO=(sudo)
fi

if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
  log "installing docker.io via apt-get"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  command -v dockerd >/dev/null || die "docker.io installed but dockerd is not on PATH"
fi

# A dockerd may already be starting (e.g. a concurrent call); a second one
# would fight over the pidfile, so only launch when none is running.
if pgrep -x dockerd >/dev/null; then
  log "dockerd already running; waiting for it"
else
  # Plain `dockerd` works in this sandbox (overlay2 on ext4, iptables via
  # nf_tables, cgroup v1), so no flags by default; FORGE_DOCKERD_ARGS lets an
  # odd host add e.g. --storage-driver=vfs --iptables=false --mtu=1400.
  read -r -a args <<<"${FORGE_DOCKERD_ARGS:-}"
  log "starting dockerd${args[*]:+ ${args[*]}} (log: $LOG)"
  # setsid+nohup: detach from our session so the daemon outlives this shell.
  "${SUDO[@]}" setsid nohup dockerd "${args[@]}" >>"$LOG" 2>&1 </dev/null &
  pid=$!
fi

for _ in $(seq "$TIMEOUT"); do
  docker_ok && { log "docker is ready"; exit 0; }
  # Fail fast instead of waiting out the timeout when our dockerd died.
  # (/proc, not kill -0: under sudo the pid is root-owned.)
  if [ -n "${pid:-}" ] && [ ! -e "/proc/$pid" ]; then break; fi
  sleep 1
done

log "--- last lines of $LOG ---"
tail -n 30 "$LOG" >&2 || true
die "dockerd exited or was not ready within ${TIMEOUT}s (see $LOG)"
