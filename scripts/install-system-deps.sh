#!/usr/bin/env bash
# Install the Debian packages Gantry needs on the host, only those that are missing.
#
#   debootstrap      builds the local stand-ins for the base images (gantry.localenv.baseimages)
#   docker-registry  the distribution registry v2 binary Gantry runs as its embedded registry
#   prometheus       the metrics server Gantry runs as its embedded Prometheus (the canary's
#                    checks are PromQL queries over what it scrapes)
#   postgresql       the database of the MLflow tracking server Gantry runs for
#                    GANTRY_TOPOLOGY=multi (bookworm: PostgreSQL 15; initdb, postgres and
#                    pg_isready under /usr/lib/postgresql/15/bin)
#   wrk              the load generator of the benchmarks
#   chromium         the browser test of the Prefect UI's run form (tests/e2e/test_ui_release.py)
#   chromium-driver  chromedriver for that test (Selenium drives Debian's chromium through it)
#   libssl-dev, pkg-config  OpenSSL for the sigstore-rs interop peer (tests/interop/sigstore-rs,
#                    built with the machine's Rust toolchain: Debian's cargo is too old for it)
#
# Idempotent: when everything is installed it changes nothing and touches no network.
# Runs as root, or through sudo when that is available.
#
# Note: the docker-registry package ships a service unit that listens on port 5000 when the
# init system starts it. Gantry never uses that instance: it runs its own registry process
# on another port (GANTRY_LOCAL_REGISTRY_ADDR, default 127.0.0.1:5075), so a system one is
# harmless; `systemctl disable --now docker-registry` stops it if the port is wanted.
# Likewise the prometheus package ships a service that listens on :9090 when the init system
# starts it. Gantry never uses it either: it runs its own Prometheus, with its own
# configuration and data under the state dir, on GANTRY_PROMETHEUS_ADDR (default
# 127.0.0.1:5077); `systemctl disable --now prometheus` stops the system one.
# And the postgresql package creates a cluster (/var/lib/postgresql/15/main) and a service
# on :5432 when the init system starts it. Gantry never uses that cluster either: it runs its
# own, created with its own password under the state dir (GANTRY_STATE_DIR/postgres), on
# GANTRY_POSTGRES_ADDR (default 127.0.0.1:5079), as the package's `postgres` system user
# when Gantry runs as root; `systemctl disable --now postgresql` stops the system one.
set -euo pipefail

PACKAGES=(debootstrap docker-registry prometheus postgresql wrk chromium chromium-driver libssl-dev pkg-config)

say() { printf 'install-system-deps: %s\n' "$*"; }

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    say "apt-get/dpkg-query not found: this script supports Debian-based hosts only;" \
        "install ${PACKAGES[*]} with your package manager" >&2
    exit 1
fi

if [[ ${EUID} -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    SUDO=()
fi

installed() {
    # dpkg-query fails for packages it has never seen; that also means "not installed".
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if installed "${pkg}"; then
        say "${pkg}: already installed ($(dpkg-query -W -f='${Version}' "${pkg}"))"
    else
        missing+=("${pkg}")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    say "nothing to do"
    exit 0
fi

if [[ ${EUID} -ne 0 && ${#SUDO[@]} -eq 0 ]]; then
    say "must install ${missing[*]} but is not root and sudo is not available;" \
        "re-run as root" >&2
    exit 1
fi

say "installing: ${missing[*]}"
# The package lists may be stale or absent (slim hosts delete them); refresh them only
# now that something must actually be installed.
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"

for pkg in "${missing[@]}"; do
    if ! installed "${pkg}"; then
        say "${pkg}: still not installed after apt-get install" >&2
        exit 1
    fi
    say "${pkg}: installed ($(dpkg-query -W -f='${Version}' "${pkg}"))"
done
