#!/usr/bin/env bash
# Installs the benchmark peers from Debian's repositories: webdis, nginx + nchan, redis-tools.
# Idempotent: installs only what is missing. Never leaves a system service running or enabled:
# bench/peers/start.sh runs its own private instances instead.
set -euo pipefail

# Debian 12: libnginx-mod-nchan depends on the nginx ABI that the "nginx" package provides
# (nginx-light is only a metapackage pulling "nginx" plus the echo module), so install "nginx".
PKGS=(webdis nginx libnginx-mod-nchan redis-tools)
# Optional bounded load generators for sanity checks: INSTALL_LOADTOOLS=1 ./install.sh
if [[ "${INSTALL_LOADTOOLS:-0}" == 1 ]]; then PKGS+=(wrk apache2-utils); fi

[[ $(id -u) == 0 ]] && SUDO=() || SUDO=(sudo)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "install.sh: all present: ${PKGS[*]}"
else
  echo "install.sh: installing: ${missing[*]}"
  # A temporary policy-rc.d (exit 101) stops the maintainer scripts from starting nginx/webdis,
  # unless one is present already (containers often ship one); ours is removed again on exit.
  POLICY=/usr/sbin/policy-rc.d
  if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
  fi
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}"
fi

# Belt and braces: make sure no system nginx/webdis is running or enabled, whatever the init
# system (systemd may be installed without being PID 1, so check how the box was booted).
for svc in nginx webdis; do
  if [[ -d /run/systemd/system ]]; then
    "${SUDO[@]}" systemctl stop "$svc" >/dev/null 2>&1 || true
  else
    "${SUDO[@]}" service "$svc" stop >/dev/null 2>&1 || true
  fi
  # Disable for the next boot too: systemd's wants-links (works offline) and the SysV rc links.
  if command -v systemctl >/dev/null; then "${SUDO[@]}" systemctl disable "$svc" >/dev/null 2>&1 || true; fi
  if command -v update-rc.d >/dev/null; then "${SUDO[@]}" update-rc.d "$svc" disable >/dev/null 2>&1 || true; fi
done
# Kill only the system daemons' own PIDs (by their system PID files), never by name.
for pidf in /run/nginx.pid /var/run/webdis/webdis.pid /run/webdis.pid; do
  if [[ -s $pidf ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
    "${SUDO[@]}" kill "$(cat "$pidf")" || true
  fi
done

echo "install.sh: versions:"
dpkg-query -W -f='  ${Package} ${Version}\n' "${PKGS[@]}"
