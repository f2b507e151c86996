"""The task registry: :func:`get_task` / :func:`list_tasks`.

Adding a task is one small module that builds :class:`TaskSpec` objects, plus one line in
``_PROVIDERS`` below naming the module and the attribute holding its list of specs. Providers are
imported on first use, so a task whose dependencies are missing does not break the others.

Example (a model, a loss and a data iterator, e.g. for an LR range test):
    >>> spec = get_task("digits-mlp")
    >>> instance = spec.build(seed=0)
    >>> batch = next(instance.batches)
    >>> instance.loss(batch).backward()
"""

from __future__ import annotations

import difflib
import importlib

from optimlab.bench.tasks.base import TaskInstance, TaskSpec

__all__ = ["TaskInstance", "TaskSpec", "get_task", "list_tasks"]

# module path, attribute holding a list[TaskSpec]
_PROVIDERS: list[tuple[str, str]] = [
    ("optimlab.bench.tasks.functions", "FUNCTION_TASKS"),
    ("optimlab.bench.tasks.digits", "DIGITS_TASKS"),
    ("optimlab.bench.tasks.rnn", "RNN_TASKS"),
    ("optimlab.bench.tasks.gpt", "GPT_TASKS"),
]

_TASKS: dict[str, TaskSpec] | None = None


def _registry() -> dict[str, TaskSpec]:
    global _TASKS
    if _TASKS is None:
        tasks: dict[str, TaskSpec] = {}
        for module_name, attribute in _PROVIDERS:
            for spec in getattr(importlib.import_module(module_name), attribute):
                tasks[spec.name] = spec
        _TASKS = tasks
    return _TASKS


def list_tasks(family: str | None = None) -> list[str]:
    """Sorted task names; ``family="function"`` or ``"model"`` filters."""
    if family not in (None, "function", "model"):
        raise ValueError(f"Invalid family: {family!r} (accepted: None, 'function', 'model')")
    return sorted(name for name, spec in _registry().items() if family is None or spec.family == family)


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; an unknown name raises ``KeyError`` listing the valid ones."""
    tasks = _registry()
    try:
        return tasks[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), tasks, n=2, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise KeyError(f"Unknown task {name!r}.{hint} Valid names: {', '.join(sorted(tasks))}") from None
