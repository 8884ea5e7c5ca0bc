#!/usr/bin/env bash
# transformers_env.sh VERSION DIR: a virtual environment at DIR in which transformers==VERSION
# (and the tokenizers / huggingface-hub it pins) overrides the one installed for $PYTHON, while
# everything else (torch, the built emu_fast, pytest, ...) comes from $PYTHON's own site
# directories. Those are added by a .pth after the environment's own, so this works whether
# $PYTHON is a system interpreter or itself a virtual environment (where venv's
# --system-site-packages would reach past it to the base interpreter).
set -euo pipefail
VERSION=$1
DIR=$2
PYTHON=${PYTHON:-python3}
rm -rf "$DIR"
"$PYTHON" -m venv "$DIR"
SITE=$("$DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" - > "$SITE/_emu_fast_parent_site.pth" <<'PY'
import site
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
# "import" lines of a .pth run at start-up; addsitedir also runs the .pth files there (an
# editable install of emu_fast is one).
print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs))
PY
"$DIR/bin/python" -m pip install -q "transformers==$VERSION"
"$DIR/bin/python" -c "
import transformers, torch, emu_fast
assert transformers.__version__ == '$VERSION', transformers.__version__
print('transformers', transformers.__version__, '| torch', torch.__version__, '| emu_fast from', emu_fast.__file__)"
