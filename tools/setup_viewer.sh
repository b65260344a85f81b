#!/usr/bin/env bash
# gum-ray viewer set-up: what the web-map viewer and its browser test need beyond .venv.
#  1. Leaflet (the JS map library of the viewer page), pinned in tools/viewer/package-lock.json,
#     installed from the npm registry into tools/viewer/node_modules and copied to
#     gum_ray/viewer/vendor/leaflet/ (git-ignored), from where `gum tiles` and `gum serve` hand it
#     to the page, so the page works offline. Without it the page loads Leaflet from a CDN.
#  2. Debian's chromium (headless, for tests/test_viewer_browser.py), through apt-get, as root.
# Idempotent: when both are there it only checks them (well under a second).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[gum-ray viewer setup] %s\n' "$*"; }
fail() { printf '[gum-ray viewer setup] error: %s\n' "$*" >&2; exit 1; }
t0=$(date +%s)

VENDOR=gum_ray/viewer/vendor/leaflet
DIST=tools/viewer/node_modules/leaflet/dist
if [ ! -f "$DIST/leaflet.js" ]; then
  command -v npm >/dev/null 2>&1 || fail "npm not found: install Node.js 18+ (Debian: apt-get install -y npm), then run this again"
  say "installing Leaflet (tools/viewer/package-lock.json) from the npm registry"
  npm ci --prefix tools/viewer --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null \
    || fail "npm ci in tools/viewer failed (is the npm registry reachable?)"
fi
if ! cmp -s "$DIST/leaflet.js" "$VENDOR/leaflet.js" 2>/dev/null; then
  rm -rf "$VENDOR"
  mkdir -p "$VENDOR"
  cp -r "$DIST/leaflet.js" "$DIST/leaflet.css" "$DIST/images" "$VENDOR/"
  cp tools/viewer/node_modules/leaflet/LICENSE "$VENDOR/LICENSE"
  say "Leaflet $(node -p "require('./tools/viewer/node_modules/leaflet/package.json').version" 2>/dev/null || echo '?') copied to $VENDOR"
fi

CHROMIUM=${GUM_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" != 0 ]; then
    fail "$CHROMIUM not found and not root: run 'apt-get install -y chromium' as root (or set GUM_CHROMIUM)"
  fi
  say "installing Debian's chromium with apt-get (once per machine, a few minutes)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends chromium fonts-liberation >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || fail "apt-get update failed (are Debian's package servers reachable?)"
    apt-get install -y -q --no-install-recommends chromium fonts-liberation >/dev/null \
      || fail "apt-get install chromium failed"
  fi
fi
"$CHROMIUM" --version >/dev/null 2>&1 || fail "$CHROMIUM does not run ('$CHROMIUM --version' failed)"
say "ok: $("$CHROMIUM" --version 2>/dev/null), Leaflet in $VENDOR ($(( $(date +%s) - t0 )) s)"
