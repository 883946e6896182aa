#!/usr/bin/env bash
# Extras for the web demo, the API server and their browser test, on top of scripts/setup.sh:
# the pip packages of requirements-demo.txt, and Debian's chromium + chromium-driver when missing.
# Idempotent and quick when everything is already there; runs unattended (root in CI, or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
$PYTHON -m pip install -q --root-user-action=ignore -r requirements-demo.txt
# Debian packages: the browser and its WebDriver, plus a CJK font so that screenshots of Chinese answers
# show characters instead of boxes (fonts-wqy-zenhei, about 10 MB).
packages=()
[ -x /usr/bin/chromium ] || packages+=(chromium)
[ -x /usr/bin/chromedriver ] || packages+=(chromium-driver)
[ -n "$(fc-list :lang=zh 2>/dev/null)" ] || packages+=(fonts-wqy-zenhei)
if [ ${#packages[@]} -gt 0 ]; then
    echo "Installing Debian packages: ${packages[*]} ..."
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
echo "demo extras ready: gradio $($PYTHON -c 'import gradio; print(gradio.__version__)'), $(/usr/bin/chromium --version 2>/dev/null | head -1)"
