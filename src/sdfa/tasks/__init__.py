"""Tasks: what a run learns. A task turns stored batches into model inputs and targets, defines
the loss (whose gradient at the output is the error e that DFA sends back) and the metrics.

The training core (:mod:`sdfa.training`) knows only this interface, so a new kind of problem
(next-token prediction, node classification, time-step models) is a new task, registered here by
name, and a data set names the task it is for (``DatasetSpec.task``).
"""

from ..registry import Registry
from .base import Task
from .classification import Classification
from .language_model import LanguageModel

TASKS: Registry[type[Task]] = Registry("task")
register_task = TASKS.register
register_task("classification", Classification)
register_task("language-model", LanguageModel)


def build_task(data, task: str | None = None, **options) -> Task:
    """The task ``task`` (default: the one the loaded data set is for, ``data.task``), built on
    the data set ``data``."""
    return TASKS.lookup(task or getattr(data, "task", "classification"))(data, **options)


__all__ = ["TASKS", "Classification", "LanguageModel", "Task", "build_task", "register_task"]
