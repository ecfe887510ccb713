""" Every change timm-mlit-run makes to timm's namespaces while a script runs, in one place

`timm_mlit.run` runs timm's scripts unmodified. Two things it adds to a training run need a hand inside train.py:
the MoE balance loss and expert shares of each epoch (`MoERecorder`), and Mobile V-MoE's super-class router loss
(`SuperClassRouting`, arXiv 2309.04354 §2.2). `patched_timm` replaces the attributes below where the scripts look
them up, for as long as the script runs, and puts each original back on exit however the script ends. No other
module of timm_mlit assigns into a timm namespace (tests/test_timm_patches.py compares this table with what
`patched_timm` swaps).

Checked against timm 1.0.28, 1.0.29, 1.0.30 and 1.0.31 (the wheels; 1.0.31 installed) and the train.py of
pytorch-image-models v1.0.28 and 1.0.29.dev0: it takes `create_model` and `ClassificationTask` by `from ... import`
when it starts (so they are replaced before it runs), `utils.update_summary` and `utils.accuracy` at each call.

============================  =========  ==========================================================================
replaced                      timm       replaced by; why; why no extension point of timm serves instead
============================  =========  ==========================================================================
timm.models.create_model      1.0.28-31  the same call, then `MoERecorder.watch(model)`: the model the script trains
                                         is hooked for its balance loss and loads. create_model has no callback,
                                         and train.py's `--device-modules` imports a module before the model
                                         exists, with no handle on it.
timm.create_model             1.0.28-31  the same replacement: timm re-exports create_model at its top level.
timm.utils.update_summary     1.0.28-31  the same call with train_moe_loss (and train_/eval_router_acc) added to
                                         the epoch's row, after appending the epoch to expert_load.csv beside
                                         summary.csv. train.py builds its metrics inside train_one_epoch() and
                                         validate(); nothing adds a column to them.
timm.utils.trim_summary       1.0.31     (only where it exists) the same call, after trimming expert_load.csv to
                                         the epochs a resumed run keeps, so that both logs agree; no hook either.
timm.task.ClassificationTask  1.0.28-31  `SuperClassRouterTask` with the super-class file and λ bound: train.py
                                         builds `ClassificationTask(...)` by name; no option or registry picks a
                                         task class.
timm.utils.accuracy           1.0.28-31  the same call, after counting the router's super-class accuracy on the
                                         batch: train.py's validate() has no hook, and this call is the one that
                                         sees each validation batch's targets after the model's forward.
============================  =========  ==========================================================================

Where timm has an extension point it is used instead: `--device-modules timm_mlit` (in every train.py recipe)
registers the models and datasets; the router loss subclasses `ClassificationTask` (`timm_mlit.task`). The datasets
that `timm_mlit.data` adds to `create_dataset`'s table are registrations for good, not replacements (timm has no
registration API; see `timm_mlit.data.register_timm_datasets`).
"""
import functools
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Type

import timm
import timm.models
import timm.task
import timm.utils
import torch

from .moe_recorder import EXPERT_LOAD_CSV, MoERecorder
from .plots import truncate_csv
from .superclasses import RouterTaskError, SuperClasses
from .task import RouterAccuracy, SuperClassRouterTask, superclass_targets

__all__ = ['SuperClassRouting', 'patched_timm']


class SuperClassRouting:
    """What `--superclasses` gives train.py: the task class it builds where it builds a ClassificationTask, and the
    router's super-class accuracy on the images its validate() scores.

    The router's eval forwards are seen through a forward hook, which the EMA copy of the model (a deepcopy)
    carries too; each validate() pass starts the count again, so the accuracy written is that of the last pass,
    the model whose metrics train.py writes beside it (the EMA model's, with --model-ema).
    """

    def __init__(self, superclasses: SuperClasses, weight: float = 0.3):
        self.superclasses = superclasses
        self.weight = weight
        self.task: Optional[SuperClassRouterTask] = None  # the task the script built
        self.eval_accuracy = RouterAccuracy()
        self._last: Dict[str, Any] = {}  # the newest eval forward of a router: its module and logits, and the counted

    def task_class(self) -> Type[SuperClassRouterTask]:
        """A `SuperClassRouterTask` that takes ClassificationTask's arguments and reports to this object."""
        routing = self

        def remember(module, args, output):
            # a function, not a bound method: deepcopy (the EMA model) would copy a bound method's object with it
            if not module.training:
                routing._last.update(router=module, logits=module.last_logits)

        class Task(SuperClassRouterTask):
            def __init__(self, model, criterion=None, **kwargs):
                super().__init__(model, routing.superclasses, routing.weight, criterion=criterion, **kwargs)
                self.router[0].register_forward_hook(remember)
                routing.task = self

        return Task

    def count_eval_batch(self, target: torch.Tensor):
        """Count the newest eval forward's router decisions against `target`'s super-classes, once."""
        last = self._last
        logits = last.get('logits')
        if logits is None or logits is last.get('counted') or target.ndim != 1 or logits.shape[0] != target.shape[0]:
            return
        if last['router'] is not last.get('counted_router'):  # another model's validate() pass: start again
            self.eval_accuracy = RouterAccuracy()
        last.update(counted=logits, counted_router=last['router'])
        assert self.task is not None  # (only a task's router is hooked)
        with torch.no_grad():
            self.eval_accuracy.update(logits, superclass_targets(target, self.task.class_to_super.to(target.device)))

    def check_task(self) -> SuperClassRouterTask:
        """The task the script built; raises if it built none to add the loss to."""
        if self.task is None:
            raise RouterTaskError('--superclasses was given, but the script built no classification task to add the '
                                  'router loss to (it is for timm\'s train.py, without distillation)')
        return self.task


@contextmanager
def patched_timm(recorder: MoERecorder, routing: Optional[SuperClassRouting] = None) -> Iterator[None]:
    """Replace the attributes of the module docstring's table (the last two only with `routing`); restored on exit.

    Args:
        recorder: watches the first model with MoE layers that the script creates; its epoch goes in summary.csv.
        routing: with `--superclasses`: the task class for train.py, and the router accuracy for summary.csv.
    """
    targets = [(timm, 'create_model'), (timm.models, 'create_model'), (timm.utils, 'update_summary'),
               (timm.utils, 'trim_summary'), (timm.task, 'ClassificationTask'), (timm.utils, 'accuracy')]
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets if hasattr(owner, name)]
    create_model = timm.models.create_model
    update_summary = timm.utils.update_summary
    trim_summary = getattr(timm.utils, 'trim_summary', None)  # timm >= 1.0.31
    accuracy = timm.utils.accuracy

    @functools.wraps(create_model)
    def create_and_watch(*args, **kwargs):
        return recorder.watch(create_model(*args, **kwargs))

    @functools.wraps(update_summary)
    def update_summary_with_moe(epoch, train_metrics, eval_metrics, filename, *args, **kwargs):
        loss = recorder.end_epoch(epoch, os.path.dirname(os.path.abspath(filename)))
        if loss is not None:
            train_metrics = dict(train_metrics, moe_loss=loss)
        if routing is not None:
            task = routing.check_task()
            train_metrics = dict(train_metrics, router_acc=task.train_accuracy.compute_and_reset())
            if eval_metrics is not None:
                eval_metrics = dict(eval_metrics, router_acc=routing.eval_accuracy.compute_and_reset())
        return update_summary(epoch, train_metrics, eval_metrics, filename, *args, **kwargs)

    def trim_summary_and_load(filename, start_epoch, *args, **kwargs):
        truncate_csv(os.path.join(os.path.dirname(os.path.abspath(filename)), EXPERT_LOAD_CSV), start_epoch)
        assert trim_summary is not None
        return trim_summary(filename, start_epoch, *args, **kwargs)

    @functools.wraps(accuracy)
    def accuracy_and_router(output, target, *args, **kwargs):
        assert routing is not None
        routing.count_eval_batch(target)
        return accuracy(output, target, *args, **kwargs)

    try:
        timm.create_model = timm.models.create_model = create_and_watch
        timm.utils.update_summary = update_summary_with_moe
        if trim_summary is not None:
            timm.utils.trim_summary = functools.wraps(trim_summary)(trim_summary_and_load)
        if routing is not None:
            timm.task.ClassificationTask = routing.task_class()  # type: ignore[misc]  # (a class, replaced on purpose)
            timm.utils.accuracy = accuracy_and_router
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
