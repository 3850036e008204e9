#!/usr/bin/env bash
# Install Debian's Chromium + ChromeDriver for the web-UI browser test (tests/server/test_browser.py).
# Idempotent and quick when both are present. Locally it never fails setup: if the browser cannot be
# installed it says so LOUDLY and exits 0; the browser test then skips with the same reason in the pytest
# summary. On CI (CI set to a true value) a browser that cannot be installed fails setup (exit 1).
set -uo pipefail
case "$(printf '%s' "${CI:-}" | tr '[:upper:]' '[:lower:]')" in
  ""|0|false|no|off) ON_CI=0 ;;
  *) ON_CI=1 ;;
esac
log() { printf '[install_browser] %s\n' "$*"; }
loud() {
  printf '\n' >&2
  printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
  printf '!!! [install_browser] %s\n' "$@" >&2
  if [ "$ON_CI" = 1 ]; then
    printf '!!! CI is set: the web UI must be tested there, so this FAILS setup.\n' >&2
  else
    printf '!!! The web-UI browser test (tests/server/test_browser.py) will be SKIPPED.\n' >&2
  fi
  printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' >&2
  exit "$ON_CI"
}

# CVX_CHROMIUM / CVX_CHROMEDRIVER point the test at another build; then there is nothing to install.
CHROMIUM="${CVX_CHROMIUM:-/usr/bin/chromium}"
DRIVER="${CVX_CHROMEDRIVER:-/usr/bin/chromedriver}"
if [ -x "$CHROMIUM" ] && [ -x "$DRIVER" ]; then
  exit 0
fi

if [ "${CVX_SKIP_BROWSER_INSTALL:-0}" = "1" ]; then
  loud "CVX_SKIP_BROWSER_INSTALL=1: not installing chromium / chromium-driver."
fi
if ! command -v apt-get >/dev/null 2>&1; then
  loud "no apt-get here: install Chromium and ChromeDriver yourself" \
       "(or set CVX_CHROMIUM and CVX_CHROMEDRIVER to their paths)."
fi
SUDO=()
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    loud "not root and no password-less sudo: run" \
         "  sudo apt-get install -y chromium chromium-driver" \
         "yourself (or set CVX_CHROMIUM and CVX_CHROMEDRIVER)."
  fi
fi

log "installing Debian's chromium + chromium-driver (once; about a minute)"
export DEBIAN_FRONTEND=noninteractive
install() { "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }
if ! install; then
  log "apt-get install failed; updating the package lists and trying again"
  "${SUDO[@]}" apt-get update -q >/dev/null 2>&1 || true
  install || true
fi
if [ -x "$CHROMIUM" ] && [ -x "$DRIVER" ]; then
  log "ready: $("$CHROMIUM" --version 2>/dev/null | head -1), $("$DRIVER" --version 2>/dev/null | head -1)"
else
  loud "apt-get could not install chromium + chromium-driver (no network to Debian's mirror?)."
fi
exit 0
