"""README.md and docs/*.md stay true: the README's set-up commands are what CI runs, every Python block of every page
runs, every other block is run by a test, the citations are CITATION.cff's, and the links lead somewhere."""
import re
from pathlib import Path

import pytest
from readme import PAGES, README, blocks, fenced

ROOT = Path(__file__).resolve().parents[1]
UNNAMED_PYTHON = [(page, index, code) for page in PAGES
                  for index, code in enumerate(code for name, code in blocks('python', page) if name is None)]


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_second():
    first, second = [code.strip() for _, code in blocks('bash')[:2]]
    assert README.index(second) < README.index('```python')  # install, then the quick start
    assert first.startswith('pip install .') and 'python -m timm_mlit' in first
    assert 'pytest' in second
    ci = (ROOT / '.ci' / 'run').read_text().splitlines()
    assert second in ci
    # The README's command runs the tests not marked slow (pyproject.toml's default); CI runs the slow ones as well.
    assert 'addopts = "-m \'not slow\'"' in (ROOT / 'pyproject.toml').read_text()
    assert 'python -m pytest -q -m slow' in ci[ci.index(second) + 1:]


def test_readme_is_a_landing_page():
    assert len(README.splitlines()) <= 250, 'the depth belongs in docs/'


@pytest.mark.parametrize('page, index, code', UNNAMED_PYTHON, ids=[f'{p}-{i}' for p, i, _ in UNNAMED_PYTHON])
def test_python_snippet_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f'{page} python block {index}', 'exec'), {'__name__': '__readme__'})


def test_every_code_block_is_run_or_checked_by_a_test():
    """Unnamed python blocks run above, the README's set-up commands are CI's (above), and bibtex is checked against
    CITATION.cff below; any other block must be named, and its name used by a test (`snippet('NAME')`, or a helper
    given 'NAME')."""
    tests = ''.join(p.read_text() for p in (ROOT / 'tests').glob('*.py') if p.name != 'readme.py')
    setup = [code for _, code in blocks('bash')[:2]]
    for page, text in PAGES.items():
        fences = [line for line in text.splitlines() if line.startswith('```')]
        found = fenced(page)
        assert len(fences) == 2 * len(found), f'{page}: every fenced block names its language'
        for name, lang, code in found:
            if name is None and not (page == 'README.md' and code in setup):
                assert lang in ('python', 'bibtex'), f'{page}: an unnamed {lang} block, run by no test:\n{code}'
            else:
                assert f"'{name}'" in tests, f'{page}: no test runs the block named {name!r}'


def test_citation_file_and_readme_bibtex_cite_both_papers():
    import yaml
    cff = yaml.safe_load((ROOT / 'CITATION.cff').read_text())
    bibtex = '\n'.join(code for _, code in blocks('bibtex'))
    papers = [cff['preferred-citation']] + cff.get('references', [])
    assert {paper['url'] for paper in papers} >= {'https://arxiv.org/abs/2407.17783', 'https://arxiv.org/abs/2309.04354'}
    for paper in papers:
        entry = re.search(r'@\w+\{[^@]*arXiv:' + re.escape(paper['url'].rsplit('/', 1)[1]) + r'[^@]*', bibtex)
        assert entry, paper['title']
        assert f"title={{{paper['title']}}}" in entry[0] and f"year={{{paper['year']}}}" in entry[0]
        first = paper['authors'][0]['family-names']
        assert f"author={{{first}," in entry[0], first
    assert cff['license'] == 'Apache-2.0' and 'Apache License' in (ROOT / 'LICENSE').read_text()[:200]


def _anchors(text: str) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
            for heading in re.findall(r'^#+ (.*)$', re.sub(r'```.*?```', '', text, flags=re.S), re.M)}


@pytest.mark.parametrize('page', list(PAGES))
def test_the_links_of_a_page_lead_to_committed_files_and_headings(page):
    folder = (ROOT / page).parent
    links = re.findall(r'\]\(([^)\s]+)\)', PAGES[page])
    assert page != 'README.md' or any(link.startswith('docs/') for link in links), 'the README links to docs/'
    for link in links:
        if link.startswith('http'):
            continue
        target, _, anchor = link.partition('#')
        path = (folder / target).resolve() if target else ROOT / page
        assert path.is_file(), f'{page} links to {target}, which is not committed'
        if anchor and path.suffix == '.md':
            assert anchor in _anchors(path.read_text()), f'{page} links to {link}: no such heading'
