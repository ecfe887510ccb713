"""The README stays true: its set-up commands are what CI runs, and every Python snippet in it runs."""
from pathlib import Path

import pytest
from readme import README, blocks

ROOT = Path(__file__).resolve().parents[1]
UNNAMED_PYTHON = [code for name, code in blocks('python') if name is None]


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_second():
    first, second = [code.strip() for _, code in blocks('bash')[:2]]
    assert README.index(first) < README.index('## ')  # both come before the first section
    assert first.startswith('pip install .') and 'python -m timm_mlit' in first
    assert 'pytest' in second
    ci = (ROOT / '.ci' / 'run').read_text()
    assert second in ci.splitlines()


@pytest.mark.parametrize('index', range(len(UNNAMED_PYTHON)))
def test_python_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = UNNAMED_PYTHON[index]
    exec(compile(code, f'README.md python block {index}', 'exec'), {'__name__': '__readme__'})


def test_citation_file_and_readme_bibtex_cite_the_same_paper():
    import yaml
    cff = yaml.safe_load((ROOT / 'CITATION.cff').read_text())
    paper = cff['preferred-citation']
    (bibtex,) = [code for _, code in blocks('bibtex')]
    assert f"title={{{paper['title']}}}" in bibtex
    assert paper['url'].rsplit('/', 1)[1] in bibtex and str(paper['year']) in bibtex
    assert cff['license'] == 'Apache-2.0' and 'Apache License' in (ROOT / 'LICENSE').read_text()[:200]


def test_the_files_the_readme_links_to_are_in_the_repository():
    import re
    local = [target for target in re.findall(r'\]\(([^)\s]+)\)', README) if not target.startswith(('http', '#'))]
    assert local, 'the README shows the committed plots'
    missing = [target for target in local if not (ROOT / target).is_file()]
    assert not missing, f'README links to files that are not committed: {missing}'
