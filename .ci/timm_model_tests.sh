#!/usr/bin/env bash
# Run timm's own per-model test suite (tests/test_models.py) against the mlit_* and mobile_vmoe_* models.
#
# The test file is not in the timm wheel, so it is taken from the sdist of the *installed* timm version
# (downloaded once into a cache dir), patched so that 'mlit_*' and 'mobile_vmoe_*' are treated like timm's other
# transformer models (added to NON_STD_FILTERS: no features_only / spatial-feature checks), and run with
# `-p timm_mlit` so the models are registered before pytest collects the parametrized tests.
#
# Usage: [PYTHON=python] .ci/timm_model_tests.sh [extra pytest args...]
#   e.g. .ci/timm_model_tests.sh -x -n 2      (a -k EXPR given here is combined as: mlit and (EXPR))
# Environment:
#   PYTHON            interpreter with timm, timm_mlit and pytest installed (default: python)
#   TIMM_SDIST_CACHE  where downloaded sdists are kept (default: ${TMPDIR:-/tmp}/timm-sdist-cache)
#   KEEP_TMP=1        keep the extracted/patched test folder (its path is printed)
# test_models.py itself reads TORCH_DEVICE (default cpu), TIMEOUT, TORCH_BACKEND and GITHUB_ACTIONS
# (when set, test_model_load_pretrained / test_model_forward_fx_torchscript are not defined).
set -euo pipefail

PYTHON="${PYTHON:-python}"

die() { echo "timm_model_tests.sh: error: $*" >&2; exit 2; }

TIMM_VERSION="$("$PYTHON" -c 'import timm; print(timm.__version__)')" || die "cannot import timm with $PYTHON"
[ -n "$TIMM_VERSION" ] || die "empty timm version"
"$PYTHON" -c 'import timm_mlit' || die "cannot import timm_mlit with $PYTHON (pip install -e . first)"

CACHE_ROOT="${TIMM_SDIST_CACHE:-${TMPDIR:-/tmp}/timm-sdist-cache}"
CACHE_DIR="$CACHE_ROOT/timm-$TIMM_VERSION"
SDIST="$CACHE_DIR/timm-$TIMM_VERSION.tar.gz"
if [ ! -s "$SDIST" ]; then
    mkdir -p "$CACHE_DIR"
    echo "Downloading the timm $TIMM_VERSION sdist into $CACHE_DIR" >&2
    DL_TMP="$(mktemp -d "$CACHE_DIR/download.XXXXXX")"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "timm==$TIMM_VERSION" -d "$DL_TMP" \
        || die "pip download of the timm==$TIMM_VERSION sdist failed"
    shopt -s nullglob
    found=("$DL_TMP"/timm-*.tar.gz)
    shopt -u nullglob
    [ "${#found[@]}" -eq 1 ] || die "expected one timm-*.tar.gz in $DL_TMP, found: ${found[*]:-none}"
    mv "${found[0]}" "$SDIST"
    rm -rf "$DL_TMP"
fi

# NOTE pytest's -k matches parent node names too (the folders below the rootdir), so no folder name
# under WORK may contain 'mlit' or 'mobile_vmoe', or every test would be selected.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/timm-model-tests.XXXXXX")"
cleanup() { if [ "${KEEP_TMP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
mkdir "$WORK/tests"

"$PYTHON" - "$SDIST" "$WORK/tests/test_models.py" <<'PY'
"""Extract tests/test_models.py from the sdist and add 'mlit_*' to its NON_STD_FILTERS list."""
import ast
import sys
import tarfile

sdist, dest = sys.argv[1:3]
with tarfile.open(sdist) as tf:
    members = [m for m in tf.getmembers() if m.isfile() and m.name.split('/')[1:] == ['tests', 'test_models.py']]
    if len(members) != 1:
        sys.exit(f'error: expected one <root>/tests/test_models.py in {sdist}, found {[m.name for m in members]}')
    src = tf.extractfile(members[0]).read().decode('utf-8')

tree = ast.parse(src)
targets = [
    node.value for node in tree.body
    if isinstance(node, ast.Assign)
    and any(isinstance(t, ast.Name) and t.id == 'NON_STD_FILTERS' for t in node.targets)
]
if len(targets) != 1 or not isinstance(targets[0], ast.List):
    sys.exit('error: test_models.py has no single module-level `NON_STD_FILTERS = [...]` list to patch '
             f'(found {len(targets)} assignment(s)); timm changed its test layout, update .ci/timm_model_tests.sh')

# insert right after the opening bracket, so a missing trailing comma can't glue strings together
node = targets[0]
lines = src.splitlines(keepends=True)
line = lines[node.lineno - 1]
col = len(line.encode('utf-8')[:node.col_offset].decode('utf-8'))  # ast offsets are utf-8 byte offsets
if line[col] != '[':
    sys.exit(f'error: unexpected NON_STD_FILTERS layout at line {node.lineno}: {line!r}')
lines[node.lineno - 1] = line[:col + 1] + "'mlit_*', 'mobile_vmoe_*', " + line[col + 1:]
patched = ''.join(lines)

check = [n.value for n in ast.parse(patched).body
         if isinstance(n, ast.Assign) and any(getattr(t, 'id', None) == 'NON_STD_FILTERS' for t in n.targets)]
if not {'mlit_*', 'mobile_vmoe_*'} <= set(ast.literal_eval(check[0])):
    sys.exit('error: patching NON_STD_FILTERS failed')
with open(dest, 'w', encoding='utf-8') as f:
    f.write('# Extracted from the timm sdist by .ci/timm_model_tests.sh; patched: NON_STD_FILTERS += mlit_*, '
            'mobile_vmoe_*\n')
    f.write(patched)
print(f'patched NON_STD_FILTERS (line {node.lineno}) of {members[0].name}', file=sys.stderr)
PY

# Our own pytest config: makes WORK the rootdir (so the project's and timm's pytest settings are not picked
# up) and declares the markers test_models.py uses ('timeout' only matters if pytest-timeout is installed).
cat > "$WORK/pytest.ini" <<'INI'
[pytest]
markers =
    base: timm model tests using the basic setup
    forward: per-model forward tests
    backward: per-model backward tests
    cfg: model config tests
    cfg_nonstd: non-standard model config tests
    torchscript: torchscript tests
    features: feature extraction tests
    fxforward: torch fx forward tests
    fxbackward: torch fx backward tests
    timeout: per-test timeout (pytest-timeout)
INI

# pytest keeps only the last -k, so fold any -k given by the caller into ours instead of letting it replace it
KEXPR="(mlit or mobile_vmoe)"
ARGS=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        -k) [ "$#" -ge 2 ] || die "-k needs an expression"; KEXPR="$KEXPR and ($2)"; shift 2 ;;
        -k*) KEXPR="$KEXPR and (${1#-k})"; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

set +e
"$PYTHON" -m pytest -p timm_mlit -p no:cacheprovider --rootdir "$WORK" -c "$WORK/pytest.ini" \
    "$WORK/tests/test_models.py" -k "$KEXPR" -q ${ARGS[@]+"${ARGS[@]}"}
rc=$?
set -e
# pytest exit code 5: nothing collected, i.e. no mlit_* model was registered
[ "$rc" -ne 5 ] || echo "timm_model_tests.sh: no tests selected: are the mlit_* / mobile_vmoe_* models registered by timm_mlit?" >&2
exit "$rc"
