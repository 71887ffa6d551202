#!/usr/bin/env bash
# The system programs the tests drive for real: OBS Studio (with obs-websocket) under Xvfb,
# Chromium with ChromeDriver for the dock page, shellcheck for the shell scripts, coturn's
# turnserver for the TURN relay the remote tests go through (on 127.0.0.1), and what the
# native OBS filter (plugin/live2diff-filter) is built with: a C compiler, make, CMake, libobs-dev. Installs
# what is missing with apt (Debian/Ubuntu), as root or through sudo; elsewhere it says what the
# OBS, browser and shellcheck tests will skip.
set -euo pipefail

need=()
command -v obs >/dev/null 2>&1 || need+=(obs-studio)
command -v xvfb-run >/dev/null 2>&1 || need+=(xvfb)
command -v xauth >/dev/null 2>&1 || need+=(xauth)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v turnserver >/dev/null 2>&1 || need+=(coturn)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || need+=(make)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
[ -e /usr/include/obs/obs-module.h ] || need+=(libobs-dev)
if [ ${#need[@]} -eq 0 ]; then
    echo "system packages for the tests: all present"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system packages for the tests: no apt-get here; install ${need[*]} yourself, or the OBS, filter, browser and TURN tests skip"
    exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
        echo "system packages for the tests: not root and no sudo; install ${need[*]} yourself, or the OBS, filter, browser and TURN tests skip"
        exit 0
    fi
fi
echo "system packages for the tests: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "system packages for the tests: installed"
