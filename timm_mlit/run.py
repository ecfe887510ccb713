""" Run one of timm's scripts with the mLiT plugin registered

    timm-mlit-run validate.py --model mlit_xxs --checkpoint output/train/RUN/model_best.pth.tar ...
    timm-mlit-run train -c train_configs/scratch/mlit_xxs_cifar10.yaml --data-dir data/cifar10
    python -m timm_mlit.run /path/to/pytorch-image-models/benchmark.py --model mlit_xxs

timm's train.py imports plugins itself (`--device-modules timm_mlit`, which every recipe in train_configs/ sets),
but validate.py, benchmark.py, inference.py and onnx_export.py have no such hook. This runs SCRIPT as `__main__`,
unmodified, after importing `timm_mlit` (the models) and `timm_mlit.data` (the torch/svhn, torch/flowers102 and
idx-file MNIST-family datasets), with `sys.argv` = [SCRIPT, ARGS...] and the script's folder first on `sys.path`,
as `python SCRIPT ARGS...` would have them.

SCRIPT is a path to a file, or a bare name (`validate.py` or `validate`) looked up in $TIMM_SCRIPTS_DIR, a checkout
of https://github.com/huggingface/pytorch-image-models (timm's wheel does not ship the scripts).
"""
import os
import runpy
import sys
from typing import Optional, Sequence

__all__ = ['main', 'resolve_script', 'SCRIPTS_DIR_ENV']

SCRIPTS_DIR_ENV = 'TIMM_SCRIPTS_DIR'
USAGE = f"""usage: timm-mlit-run SCRIPT [ARGS...]

Run a timm script (train.py, validate.py, benchmark.py, inference.py, onnx_export.py, ...) with the mLiT models
and datasets registered. SCRIPT is a path, or a bare name looked up in ${SCRIPTS_DIR_ENV}."""


class RunError(SystemExit):
    """A clear, user-facing error: exits with the message on stderr and status 1."""

    def __init__(self, msg: str):
        super().__init__(f'timm-mlit-run: error: {msg}')


def resolve_script(script: str, scripts_dir: Optional[str] = None) -> str:
    """The absolute path of SCRIPT: the file itself if it exists, else `<scripts_dir>/<name>[.py]`.

    Args:
        script: a path, or a bare name such as 'validate.py' or 'validate'.
        scripts_dir: where bare names are looked up; default $TIMM_SCRIPTS_DIR.
    """
    if os.path.isfile(script):
        return os.path.abspath(script)
    if scripts_dir is None:
        scripts_dir = os.environ.get(SCRIPTS_DIR_ENV, '')
    looked = [script]
    bare = os.path.basename(script) == script
    if bare and scripts_dir:
        names = [script] if script.endswith('.py') else [script, script + '.py']
        for name in names:
            path = os.path.join(scripts_dir, name)
            if os.path.isfile(path):
                return os.path.abspath(path)
            looked.append(path)
    if not bare:
        hint = ''
    elif not scripts_dir:
        hint = f'; {SCRIPTS_DIR_ENV} is not set (point it at a pytorch-image-models checkout to use bare names)'
    elif not os.path.isdir(scripts_dir):
        hint = f'; {SCRIPTS_DIR_ENV}={scripts_dir} is not a directory'
    else:
        hint = f' (in {SCRIPTS_DIR_ENV}={scripts_dir})'
    raise RunError(f'script {script!r} not found: looked for {", ".join(looked)}{hint}')


def main(argv: Optional[Sequence[str]] = None):
    """Run `argv[0]` as `__main__` with `argv[1:]` as its arguments. Its SystemExit (status) passes through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    path = resolve_script(argv[0])

    import timm_mlit  # noqa: F401  (registers mlit_s, mlit_xs, mlit_xxs)
    import timm_mlit.data  # noqa: F401  (registers torch/svhn, torch/flowers102, the idx MNIST family)

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path] + argv[1:]
    sys.path.insert(0, os.path.dirname(path))  # as `python SCRIPT` does: the script's folder comes first
    try:
        runpy.run_path(path, run_name='__main__')
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


if __name__ == '__main__':
    sys.exit(main())
