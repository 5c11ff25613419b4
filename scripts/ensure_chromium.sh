#!/usr/bin/env bash
# Make sure a headless Chromium and its WebDriver are installed, for the browser test of
# `worldline-play` (tests/test_play_browser.py runs this from a session fixture).
#
#   scripts/ensure_chromium.sh     apt-get install chromium chromium-driver when either is missing
#
# Debian's packages, not a browser download: playwright's/selenium-manager's own downloads do
# not work on our offline CI machines, apt mirrors do. Root runs apt-get directly, anyone else
# through `sudo -n` (never prompts). Exit codes: 0 installed (or already there); 3 apt-get
# itself is unavailable (the test skips with this reason); anything else: the install failed.
set -euo pipefail

PACKAGES=(chromium chromium-driver)
log() { echo "ensure_chromium: $*" >&2; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} == 0 ]] && command -v chromedriver >/dev/null; then
  log "present: $(command -v chromium) $(command -v chromedriver)"
  exit 0
fi
command -v apt-get >/dev/null || { log "apt-get not available: cannot install ${missing[*]}"; exit 3; }
SUDO=()
if [[ $(id -u) != 0 ]]; then
  command -v sudo >/dev/null && sudo -n true 2>/dev/null \
    || { log "not root and no password-less sudo: cannot install ${missing[*]}"; exit 3; }
  SUDO=(sudo -n)
fi
log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# `update` only when the package lists do not know the packages yet (a fresh image).
apt-cache show chromium-driver >/dev/null 2>&1 || "${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v chromedriver >/dev/null || { log "chromedriver still missing after install"; exit 1; }
log "installed: $(command -v chromium) $(command -v chromedriver)"
