# Shared by scripts/test.sh and scripts/demo.sh: a virtual environment other users can run.
#
# Debian's /usr/bin/python3 is used on purpose: a pyenv build inside root's home
# cannot be entered by the test users, nor can a venv made from it.

ensure_system_python() {
    if [ ! -x /usr/bin/python3 ] || ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
        else
            echo "needs Debian's python3 and python3-venv: sudo apt-get install python3-venv" >&2
            exit 1
        fi
    fi
}

# Where the venv goes: .venv in the checkout, unless other users cannot reach the
# checkout (a clone under /root, say); then a root-owned folder they can read.
choose_venv() {
    local repo=$1
    if [ -n "${GPULANE_VENV:-}" ]; then
        echo "$GPULANE_VENV"
    elif [ "$(id -u)" = 0 ] && ! setpriv --reuid=nobody --regid=nogroup --clear-groups -- test -r "$repo/pyproject.toml" 2>/dev/null; then
        echo "/opt/gpulane/venv"
    else
        echo "$repo/.venv"
    fi
}

make_venv() {
    local venv=$1 spec=$2
    if [ ! -x "$venv/bin/python" ]; then
        echo "== creating $venv"
        /usr/bin/python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
    fi
    echo "== installing gpulane ($spec) into $venv"
    # Not editable: the package lands inside the venv, so users who cannot read the checkout run it.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$spec"
    chmod -R a+rX "$venv"
}

# JupyterHub's proxy is a Node.js program (configurable-http-proxy, from npm).
ensure_proxy() {
    if ! command -v npm >/dev/null; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
        else
            echo "needs Node.js and npm for JupyterHub's proxy: sudo apt-get install nodejs npm" >&2
            exit 1
        fi
    fi
    npm install -g --silent configurable-http-proxy >/dev/null
}
