"""Code blocks of README.md and docs/*.md for the tests that run them. A block preceded by `<!-- snippet: NAME -->`
is run by the test that needs its fixtures (snippet(NAME), looked up in every page); every other python block is run
as is by test_readme.py."""
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
PAGES: Dict[str, str] = {path.relative_to(ROOT).as_posix(): path.read_text()
                         for path in [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))}
README = PAGES['README.md']
_BLOCK = re.compile(r'(?:<!-- snippet: (?P<name>[\w-]+) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```', re.S)


def page(name: str) -> str:
    """The text of a page: 'README.md' or 'docs/NAME.md'."""
    return PAGES[name]


def fenced(page: str = 'README.md') -> List[Tuple[Optional[str], str, str]]:
    """(name or None, language, code) of every fenced block of `page`, in order."""
    return [(m['name'], m['lang'], m['code']) for m in _BLOCK.finditer(PAGES[page])]


def blocks(lang: Optional[str] = None, page: str = 'README.md') -> List[Tuple[Optional[str], str]]:
    """(name or None, code) of every fenced block of `page` in language `lang` (any language if None), in order."""
    return [(name, code) for name, block_lang, code in fenced(page) if lang is None or block_lang == lang]


def snippet(name: str) -> str:
    """The block named `name`, wherever it is: exactly one block of all the pages may have that name."""
    found = [code for p in PAGES for block_name, code in blocks(page=p) if block_name == name]
    if len(found) != 1:
        raise LookupError(f'README.md and docs/*.md have {len(found)} blocks named {name!r}')
    return found[0]
