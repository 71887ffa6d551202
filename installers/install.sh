#!/usr/bin/env bash
# live2diff-engine installer for Linux and macOS: a thin wrapper.
# It only finds (or, when uv is there, fetches) a Python 3.10-3.12, makes the venv PREFIX/venv and hands
# over to live2diff_engine/installer.py, which does the rest: torch build for your GPU, the project, the
# models, the virtual camera, OBS, the launcher. Run it again to upgrade in place.
# Usage: installers/install.sh [--prefix DIR] [--python PYTHON] [--cpu] [--no-models] [--no-vcam]
#        [--no-obs] [--no-shortcut] [--port N] [--yes] [--dry-run] [--uninstall]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
installer="$repo/live2diff_engine/installer.py"
prefix=""
python=""
uninstall=0
help=0
pass=()

die() { echo "install.sh: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a folder, e.g. --prefix ~/live2diff"; prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#*=}"; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs a Python 3.10-3.12 executable"; python="$2"; shift 2 ;;
        --python=*) python="${1#*=}"; shift ;;
        --uninstall) uninstall=1; pass+=("$1"); shift ;;
        -h|--help) help=1; shift ;;
        *) pass+=("$1"); shift ;;
    esac
done

[ -f "$installer" ] || die "$installer not found; run this script from a complete live2diff-engine folder"

# A 64-bit Python 3.10, 3.11 or 3.12 (the versions the package supports; torch has no 32-bit wheels).
suitable() {
    "$1" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) and sys.maxsize > 2**32 else 1)' >/dev/null 2>&1
}

find_python() {
    local c
    for c in python3.12 python3.11 python3.10 python3 python; do
        if command -v "$c" >/dev/null 2>&1 && suitable "$(command -v "$c")"; then
            command -v "$c"
            return 0
        fi
    done
    if command -v uv >/dev/null 2>&1; then
        echo "install.sh: no Python 3.10-3.12 found; fetching Python 3.11 with uv" >&2
        uv python install 3.11 >&2 || return 1
        uv python find 3.11
        return $?
    fi
    return 1
}

if [ -n "$python" ]; then
    suitable "$python" || die "$python is not a 64-bit Python 3.10-3.12; pass another with --python"
else
    python="$(find_python)" || {
        case "$(uname -s)" in
            Darwin) hint="brew install python@3.11 (https://brew.sh), or the installer from https://www.python.org/downloads/macos/" ;;
            *) hint="sudo apt-get install python3.11 python3.11-venv (Debian/Ubuntu), sudo dnf install python3.11 (Fedora), or install uv (https://docs.astral.sh/uv/)" ;;
        esac
        die "no Python 3.10-3.12 found. Install one: $hint; then run this script again (or pass --python PATH)"
    }
fi

if [ "$help" = 1 ]; then
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    echo
    exec "$python" "$installer" --help
fi

if [ -z "$prefix" ]; then
    if [ "$(uname -s)" = Darwin ]; then
        prefix="$HOME/Library/Application Support/live2diff-engine"
    else
        prefix="${XDG_DATA_HOME:-$HOME/.local/share}/live2diff-engine"
    fi
fi
mkdir -p "$prefix" || die "cannot create $prefix; pick a folder you can write with --prefix DIR"
prefix="$(cd "$prefix" && pwd)"
venv="$prefix/venv"

# Uninstall runs with the outer Python: it deletes the venv.
if [ "$uninstall" = 1 ]; then
    exec "$python" "$installer" --prefix "$prefix" --venv "$venv" --repo "$repo" ${pass[@]+"${pass[@]}"}
fi

if [ -x "$venv/bin/python" ] && ! suitable "$venv/bin/python"; then
    die "$venv holds an unsupported Python; delete that folder and run this script again"
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "install.sh: creating the virtual environment $venv with $python"
    "$python" -m venv "$venv" || die "could not create $venv. On Debian/Ubuntu install the venv module: sudo apt-get install python3-venv (or python3.X-venv for your version), then run this script again"
fi

exec "$venv/bin/python" "$installer" --prefix "$prefix" --venv "$venv" --repo "$repo" ${pass[@]+"${pass[@]}"}
