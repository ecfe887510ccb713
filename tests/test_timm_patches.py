"""timm_mlit.timm_patches: its table names exactly what it replaces in timm, and every original is back afterwards."""
import json
import sys
import types

import pytest
import timm
import timm.task
import timm.utils
import torch
import torch.nn as nn

import timm_mlit  # noqa: F401
from timm_mlit import timm_patches
from timm_mlit.moe_recorder import MoERecorder
from timm_mlit.run import main
from timm_mlit.superclasses import SuperClasses
from timm_mlit.timm_patches import SuperClassRouting, patched_timm


def _timm_namespaces() -> dict:
    """{(module, attribute): object} of every timm module imported so far (submodules left out)."""
    return {(name, attr): value for name, module in list(sys.modules.items())
            if module is not None and (name == 'timm' or name.startswith('timm.'))
            for attr, value in vars(module).items() if not isinstance(value, types.ModuleType)}


def _changed(before: dict, after: dict) -> set:
    """'module.attribute' of each attribute of a module in `before` that `after` holds another object in (or new)."""
    modules = {name for name, _ in before}
    return {f'{name}.{attr}' for (name, attr), value in after.items()
            if name in modules and before.get((name, attr), _changed) is not value}


def _table() -> set:
    """The attributes in the first column of the module docstring's table (between its 2nd and 3rd rule)."""
    lines = timm_patches.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith('====')]
    assert len(rules) == 3, 'the table is one header row between two rules, then its rows, then a rule'
    return {line.split()[0] for line in lines[rules[1] + 1:rules[2]] if line and not line[0].isspace()}


def _exists(dotted: str) -> bool:
    module, _, attr = dotted.rpartition('.')
    return hasattr(sys.modules[module], attr)


def test_the_table_lists_exactly_the_attributes_the_context_manager_replaces():
    routing = SuperClassRouting(SuperClasses([0, 1]))
    before = _timm_namespaces()
    with patched_timm(MoERecorder(), routing):
        swapped = _changed(before, _timm_namespaces())
    # a row for an attribute this timm lacks (trim_summary before 1.0.31) is replaced only where it exists
    assert swapped == {name for name in _table() if _exists(name)}
    assert _changed(before, _timm_namespaces()) == set()  # all back
    with patched_timm(MoERecorder()):  # without --superclasses: neither the task nor accuracy
        assert not {'timm.task.ClassificationTask', 'timm.utils.accuracy'} & _changed(before, _timm_namespaces())


SCRIPT = '''
import json, sys
import timm.utils, timm.utils.metrics
from timm.task import ClassificationTask
from timm_mlit.task import SuperClassRouterTask
with open(sys.argv[1], 'w') as f:
    json.dump(dict(task=issubclass(ClassificationTask, SuperClassRouterTask),
                   accuracy=timm.utils.accuracy is not timm.utils.metrics.accuracy), f)
if len(sys.argv) > 2:
    raise RuntimeError(sys.argv[2])
'''


@pytest.mark.parametrize('ending', ['builds no task', 'raises'])
def test_after_a_run_every_timm_attribute_is_the_original_again(tmp_path, ending):
    script, seen = tmp_path / 'train.py', tmp_path / 'seen.json'
    script.write_text(SCRIPT)
    superclasses = SuperClasses([0, 1]).save(str(tmp_path / 'sc.json'))
    before = _timm_namespaces()
    argv = [str(script), str(seen), '--superclasses', superclasses]
    if ending == 'raises':
        with pytest.raises(RuntimeError, match='the script failed'):
            main(argv + ['the script failed'])
    else:
        with pytest.raises(SystemExit, match='the script built no classification task'):
            main(argv)
    assert json.loads(seen.read_text()) == dict(task=True, accuracy=True)  # replaced while it ran
    assert _changed(before, _timm_namespaces()) == set()


def test_the_task_train_py_builds_adds_router_accuracy_to_the_summary(tmp_path):
    """What train.py does, in brief: build a ClassificationTask, train through it, validate the model and then its EMA
    copy with utils.accuracy, write the epoch's row. The row gets the router's super-class accuracy on the training
    images and on the validation images of the last model validated, the EMA copy (whose metrics train.py writes)."""
    import copy
    import csv
    torch.manual_seed(0)
    routing = SuperClassRouting(SuperClasses([0, 0, 1, 1]), weight=0.5)
    x, y = torch.randn(6, 3, 36, 36), torch.tensor([0, 1, 2, 3, 0, 1])
    super_of = torch.tensor([0, 0, 1, 1])[y]

    def router_acc(model):
        return 100. * (model.blocks[1].router.last_logits.argmax(1) == super_of).float().mean().item()

    with patched_timm(MoERecorder(), routing):
        model = timm.create_model('mobile_vmoe_vit_xxs_patch3_36', num_experts=2, depth=3, num_classes=4)
        task = timm.task.ClassificationTask(model=model, criterion=nn.CrossEntropyLoss())
        ema = copy.deepcopy(model).eval()  # as train.py's task.setup_ema makes it: the router's hooks copied too
        result = task(x, y)
        train_acc = router_acc(model)
        with torch.no_grad():
            ema.blocks[1].router.weight.zero_()  # (it routes every image to expert 0: 4 of 6 right)
            for m in (model.eval(), ema):
                timm.utils.accuracy(m(x), y, topk=(1, 2))
        model_acc, ema_acc = router_acc(model), router_acc(ema)
        timm.utils.update_summary(0, dict(loss=1.0), dict(top1=50.0), filename=str(tmp_path / 'summary.csv'),
                                  write_header=True)
    assert routing.task is task and task.router_loss_weight == 0.5 and 'router_loss' in result
    with open(tmp_path / 'summary.csv', newline='') as f:
        row, = csv.DictReader(f)
    assert float(row['train_router_acc']) == pytest.approx(train_acc)
    assert ema_acc != model_acc and float(row['eval_router_acc']) == pytest.approx(ema_acc)
    assert float(row['train_moe_loss']) >= 0 and (tmp_path / 'expert_load.csv').is_file()
