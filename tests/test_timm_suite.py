"""timm's own model test suite (tests/test_models.py of the installed timm's sdist) on the mlit_* and
mobile_vmoe_* models, run the way timm runs it for its own transformers (see .ci/timm_model_tests.sh)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / '.ci' / 'timm_model_tests.sh'


@pytest.mark.slow
def test_timm_test_models_passes_for_mlit():
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop('GITHUB_ACTIONS', None)  # keep the fx+torchscript test defined
    # the script already passes -q; no second -q, which would hide the 'N passed' summary read below
    proc = subprocess.run(['bash', str(SCRIPT), '-p', 'no:cacheprovider'], env=env, capture_output=True,
                          text=True, timeout=1500)
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    passed = int(re.search(r'(\d+) passed', proc.stdout).group(1))
    import timm

    import timm_mlit  # noqa: F401
    models = len(timm.list_models('mlit_*')) + len(timm.list_models('mobile_vmoe_*'))
    assert passed >= 7 * models, tail  # 7 tests a model in timm 1.0.31 (forward, backward, cfgs, jit, fx x3)
    assert 'failed' not in proc.stdout.splitlines()[-1], tail
