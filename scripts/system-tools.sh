#!/usr/bin/env bash
# The system tools the slow tier and the alert tests use: a real Prometheus server and promtool,
# both in Debian's `prometheus` package. Called by scripts/setup.sh; runs alone too. Idempotent.
#   bash scripts/system-tools.sh
#
# It minds its own business: nothing happens when both tools are on PATH; `sudo` only when not
# root; and no Prometheus is ever stopped by name. The package may start its system service on
# install (the tests run their own servers): set-up stops that one only, by the PID its pid file
# names, if that PID is new, and disables the service it installed. A user's own `prometheus`
# processes are never touched (tests/test_setup.py runs this beside a dummy one).
set -euo pipefail

PIDFILE=/run/prometheus/prometheus.pid    # the package's service (its init script's --pidfile)

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "error: not root and no sudo: cannot run $*" >&2
        return 1
    fi
}

service_pid() {
    # the running process the package's pid file names, if any
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

package_installed() {
    dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q "install ok installed"
}

stop_service_started_by_install() {
    # $1: the service's PID before the install (empty: none ran). A new one is set-up's doing.
    local before=$1 now
    now=$(service_pid)
    if [ -n "$now" ] && [ "$now" != "$before" ]; then
        echo "stopping the prometheus service the package started (pid $now)"
        as_root kill "$now"
    fi
    if [ -z "$before" ] && [ -d /run/systemd/system ]; then
        # systemd: the unit the package just enabled, not any other prometheus
        as_root systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
}

main() {
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
        echo "prometheus and promtool: already installed"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "warning: no apt-get: install Prometheus (prometheus and promtool) yourself for the slow tier" >&2
        return 0
    fi
    local before ours=yes
    before=$(service_pid)
    # a package that was there before (the tools merely off PATH) is the user's, its service too
    if package_installed; then ours=""; fi
    # stale package lists still install where the mirror is unreachable: not fatal
    as_root apt-get update -qq || echo "warning: apt-get update failed; installing from the package lists there are" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    if [ -n "$ours" ]; then stop_service_started_by_install "$before"; fi
}

# sourced (tests/test_setup.py calls the functions): define only
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
