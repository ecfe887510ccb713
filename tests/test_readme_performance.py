"""The README's performance tables are what benchmarks/readme_tables.py writes from the committed results
(benchmarks/results/*.json): a table not regenerated after a benchmark re-run fails here."""
import json
import sys
from pathlib import Path

import pytest
from readme import README

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import readme_tables  # noqa: E402


def test_readme_tables_are_what_the_committed_results_give():
    assert readme_tables.render(README) == README, 'run: python benchmarks/readme_tables.py'


def test_a_results_file_missing_a_model_row_is_rejected_naming_it(tmp_path):
    row = dict(params=1, latency_b1_ms=1., eval_img_s=1., train_img_s=1., train_peak_mib=1.)
    rows = [dict(row, model=spec) for spec in readme_tables.MODEL_ROWS if spec != 'mlit_xxs@dense']
    meta = dict(command='python benchmarks/models.py', torch='2', machine='cpu')
    (tmp_path / 'models_cpu_float32.json').write_text(json.dumps(dict(meta=meta, rows=rows)))
    missing = r'models_cpu_float32\.json has no row for mlit_xxs@dense:'
    with pytest.raises(readme_tables.ReadmeTableError, match=missing):
        readme_tables.models_table(tmp_path)
    rows.append(dict(row, model='mlit_xxs@dense'))
    (tmp_path / 'models_cpu_float32.json').write_text(json.dumps(dict(meta=meta, rows=rows)))
    assert "mlit_xxs, `moe_impl='dense'`" in readme_tables.models_table(tmp_path)


def test_a_readme_without_a_tables_markers_is_rejected():
    with pytest.raises(readme_tables.ReadmeTableError, match='no <!-- begin table: models -->'):
        readme_tables.render(README.replace('<!-- begin table: models -->', ''))


def test_check_exits_with_one_error_line_when_a_table_is_stale(tmp_path, monkeypatch, capsys):
    stale = tmp_path / 'README.md'
    stale.write_text(README.replace('<!-- end table: models -->', '| stale |\n<!-- end table: models -->'))
    monkeypatch.setattr(readme_tables, 'README', stale)
    with pytest.raises(SystemExit) as exit_:
        readme_tables.main(['--check'])
    assert str(exit_.value).startswith('readme_tables.py: error: ')
