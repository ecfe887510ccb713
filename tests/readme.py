"""Code blocks of README.md for the tests that run them. A block preceded by `<!-- snippet: NAME -->` is run by the
test that needs its fixtures (snippet(NAME)); every other python block is run as is by test_readme.py."""
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
_BLOCK = re.compile(r'(?:<!-- snippet: (?P<name>[\w-]+) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```', re.S)


def blocks(lang: str):
    """(name or None, code) of every fenced block in language `lang`, in order."""
    return [(m['name'], m['code']) for m in _BLOCK.finditer(README) if m['lang'] == lang]


def snippet(name: str) -> str:
    found = [code for block_name, code in blocks('python') + blocks('bash') if block_name == name]
    if len(found) != 1:
        raise LookupError(f'README.md has {len(found)} blocks named {name!r}')
    return found[0]
