#!/usr/bin/env bash
# Extras for the web demo, the API server and their browser test, on top of scripts/setup.sh:
# the pip packages of requirements-demo.txt, and Debian's chromium + chromium-driver and a CJK font when missing.
# Run from a terminal it asks before installing Debian packages; in CI (CI=true) or without a terminal it installs
# them unattended (root, or sudo). GLMTUNE_NO_APT=1 leaves them out (the browser test is then skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GLMTUNE_NO_APT=${GLMTUNE_NO_APT:-0}
if [ "$GLMTUNE_NO_APT" != 0 ] && [ "$GLMTUNE_NO_APT" != 1 ]; then
    echo "error: GLMTUNE_NO_APT must be 0 or 1, got '$GLMTUNE_NO_APT'" >&2
    exit 2
fi
echo "glmtune demo setup: installing requirements-demo.txt: gradio, selenium, fastapi, uvicorn, openai ..."
progress=()
[ -t 1 ] || progress=(--progress-bar off)
$PYTHON -m pip install --disable-pip-version-check --root-user-action=ignore "${progress[@]}" -r requirements-demo.txt
# Debian packages: the browser and its WebDriver, plus a CJK font so that screenshots of Chinese answers
# show characters instead of boxes (fonts-wqy-zenhei, about 10 MB).
packages=()
[ -x /usr/bin/chromium ] || packages+=(chromium)
[ -x /usr/bin/chromedriver ] || packages+=(chromium-driver)
[ -n "$(fc-list :lang=zh 2>/dev/null)" ] || packages+=(fonts-wqy-zenhei)

wanted() {  # whether to install the missing Debian packages: asked only when someone can answer
    if [ "$GLMTUNE_NO_APT" = 1 ]; then
        echo "glmtune demo setup: leaving out Debian packages ${packages[*]} (GLMTUNE_NO_APT=1)"
        return 1
    fi
    if [ ! -t 0 ] || [ "${CI:-}" = true ]; then
        return 0
    fi
    local answer
    read -r -p "glmtune demo setup: install Debian packages ${packages[*]} with apt-get (for the browser test)? [Y/n] " answer
    case $answer in
        "" | [Yy]*) return 0 ;;
        *)
            echo "glmtune demo setup: left out; GLMTUNE_NO_APT=1 skips this question"
            return 1
            ;;
    esac
}

if [ ${#packages[@]} -gt 0 ] && wanted; then
    echo "glmtune demo setup: installing Debian packages ${packages[*]} (apt-get update, then install) ..."
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
browser="no chromium (the browser test is skipped)"
[ -x /usr/bin/chromium ] && browser=$(/usr/bin/chromium --version 2>/dev/null | head -1)
echo "demo extras ready: gradio $($PYTHON -c 'import gradio; print(gradio.__version__)'), $browser"
