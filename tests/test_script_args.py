"""timm_mlit.script_args: what the launcher reads of a script's source and of its command line, before it runs."""
import os

import pytest

from timm_mlit.script_args import find_option, read_script

# Parsers at the top and inside main(), a group, a non-literal default, and '--config' only in prose.
SOURCE = '''
import argparse, os
open(os.environ['RAN'], 'w').close()  # work done at the top level: reading the script must not do it
config_parser = argparse.ArgumentParser(add_help=False)
config_parser.add_argument('-c', '--config', default='', help="a YAML file ('--amp-dtype' may be set there)")

def main():
    parser = argparse.ArgumentParser()
    group = parser.add_argument_group('Device')
    group.add_argument('--device', default='cuda', type=str)
    group.add_argument('--amp-dtype', default=os.environ.get('DTYPE', 'float16'))
    parser.add_argument('--device-modules', default=None, nargs='+')
    # parser.add_argument('--resume')
'''


def test_options_and_literal_defaults_come_from_the_syntax_tree_without_running_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv('RAN', str(tmp_path / 'ran'))
    (tmp_path / 'train.py').write_text(SOURCE)
    script = read_script(str(tmp_path / 'train.py'))
    assert script.options == {'-c': '', '--config': '', '--device': 'cuda', '--amp-dtype': None,
                              '--device-modules': None}
    assert script.takes_config and script.trains_with_amp and not script.takes_classification_task
    assert not (tmp_path / 'ran').exists()


@pytest.mark.parametrize('source, takes', [
    ('from timm.task import ClassificationTask\n', True),
    ('import timm.task\ntask = timm.task.ClassificationTask(model=None)\n', True),
    ('from timm.task import ClassificationTask as Task\n', True),
    ('print("no ClassificationTask here")  # nor a ClassificationTask\n', False),
])
def test_a_script_takes_classification_task_where_its_code_refers_to_it(tmp_path, source, takes):
    (tmp_path / 's.py').write_text(source)
    assert read_script(str(tmp_path / 's.py')).takes_classification_task is takes


@pytest.mark.parametrize('content', [None, "parser.add_argument('--config'\n", b"x = '\0'"])
def test_a_script_that_cannot_be_read_or_parsed_declares_nothing(tmp_path, content):
    path = tmp_path / 's.py'
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    script = read_script(str(path))
    assert script.options == {} and not script.takes_config and not script.takes_classification_task


SCRIPTS_DIR = os.environ.get('TIMM_SCRIPTS_DIR', '')


@pytest.mark.skipif(not os.path.isfile(os.path.join(SCRIPTS_DIR, 'validate.py')),
                    reason='TIMM_SCRIPTS_DIR is not set (or has no train.py and validate.py)')
def test_timms_train_py_and_validate_py_read_as_the_launcher_needs():
    train = read_script(os.path.join(SCRIPTS_DIR, 'train.py'))
    assert train.takes_config and train.trains_with_amp and train.takes_classification_task
    assert train.options['--device'] == 'cuda' and '--device-modules' in train.options
    validate = read_script(os.path.join(SCRIPTS_DIR, 'validate.py'))
    assert not validate.takes_config and not validate.trains_with_amp and not validate.takes_classification_task
    assert validate.options['--device'] == 'cuda'


def test_an_option_is_found_in_both_forms_the_last_one_winning_and_not_after_double_dash():
    assert find_option(['--device', 'cpu', '--device=cuda:1'], '--device') == (True, 'cuda:1')
    assert find_option(['--device-modules', 'x'], '--device') == (False, None)
    assert find_option(['--amp'], '--amp') == (True, None)
    assert find_option(['--', '--device', 'cpu'], '--device') == (False, None)
