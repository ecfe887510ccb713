"""What the console scripts share: one help layout and one way for an error to end a command.

Library functions raise ordinary exceptions whose message names the problem (ValueError, FileNotFoundError, a
module's own subclass of them); only a console script's `main` turns one into an exit: `<prog>: error: <msg>` on
stderr, status 1 (argparse's usage errors keep their status 2). A script adopts it in two lines:

    parser = argparse.ArgumentParser(prog='timm-mlit-pretrain', formatter_class=cli.HelpFormatter, ...)

    @cli.exit_on_error('timm-mlit-pretrain')   # or `with cli.exit_on_error(prog):` around the part that may fail
    def main(argv=None):
        ...

`fail(prog, msg)` ends a command at once where a `main` finds the problem itself, and `log_to_stderr(prog, logger)`
shows a library's warnings as `<prog>: warning: <msg>` lines.
"""
import argparse
import logging
import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn, Tuple, Type

__all__ = ['HelpFormatter', 'fail', 'exit_on_error', 'log_to_stderr']


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each option's default after its help; not for flags (on or off) nor for
    options that are off unless given (a default of None, False, '' or []), whose help says what happens."""

    def _get_help_string(self, action):
        default = action.default
        if action.nargs == 0 or default is None or default is False or (isinstance(default, (str, list))
                                                                          and not default):
            return action.help
        return super()._get_help_string(action)


def fail(prog: str, msg: object) -> NoReturn:
    """End the command: `msg` as one `<prog>: error: ...` line on stderr, status 1 (SystemExit with a message)."""
    raise SystemExit(f'{prog}: error: {msg}')


@contextmanager
def exit_on_error(prog: str, errors: Tuple[Type[BaseException], ...] = (ValueError, OSError)) -> Iterator[None]:
    """Turn one of `errors` raised inside into `fail(prog, <its message>)`; usable as a decorator of `main`."""
    try:
        yield
    except errors as e:
        fail(prog, e)


class _StderrHandler(logging.Handler):
    """`<prog>: <level>: <msg>` lines; looks sys.stderr up at each line, so a replaced stream is followed."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def emit(self, record: logging.LogRecord):
        print(f'{self.prog}: {record.levelname.lower()}: {record.getMessage()}', file=sys.stderr)


def log_to_stderr(prog: str, logger: logging.Logger, level: int = logging.INFO):
    """Show `logger`'s records as `<prog>: warning: ...` lines on stderr (once, however often called), at `level`
    unless the logger has a level already."""
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler(prog))
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
