# Sourced by the other scripts: creates .venv on first use, installs requirements.txt when it changed, activates it.
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv ..."
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.requirements.sha
if [ ! -f "$stamp" ] || ! sha1sum -c --status "$stamp" 2>/dev/null; then
    echo "installing requirements.txt into .venv ..."
    python -m pip install -q --upgrade pip
    python -m pip install -q -r requirements.txt
    sha1sum requirements.txt > "$stamp"
fi
