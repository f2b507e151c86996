"""The task registry: :func:`get_task` / :func:`list_tasks`, and the user's own tasks.

Built-in tasks: one small module that builds :class:`TaskSpec` objects, plus one line in ``_PROVIDERS``
below naming the module and the attribute holding its list of specs. Providers are imported on first
use, so a task whose dependencies are missing does not break the others.

The user's tasks come from a reference (``PATH.py:NAME``, ``package.module:NAME``, loaded by
:func:`load_tasks`), from the ``optimlab.tasks`` entry-point group (found by :func:`get_task` on first
miss, listed by :func:`all_tasks`), or from :func:`register_tasks` (the in-process API); see
:mod:`optimlab.bench.tasks.loader`. :func:`make_task` builds a task from plain callables.

Example (a model, a loss and a data iterator, e.g. for an LR range test):
    >>> spec = get_task("digits-mlp")
    >>> instance = spec.build(seed=0)
    >>> batch = next(instance.batches)
    >>> instance.loss(batch).backward()
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
from pathlib import Path

from collections.abc import Sequence

from optimlab.bench.tasks.base import TaskInstance, TaskSpec
from optimlab.bench.tasks.loader import TaskLoadError, entry_point_tasks, fingerprint, is_reference, load_reference
from optimlab.bench.tasks.simple import make_task

__all__ = ["TaskInstance", "TaskLoadError", "TaskSpec", "all_tasks", "fingerprint", "get_task", "list_tasks",
           "load_tasks", "make_task", "register_tasks", "resolve_task_names"]

# module path, attribute holding a list[TaskSpec]
_PROVIDERS: list[tuple[str, str]] = [
    ("optimlab.bench.tasks.functions", "FUNCTION_TASKS"),
    ("optimlab.bench.tasks.digits", "DIGITS_TASKS"),
    ("optimlab.bench.tasks.rnn", "RNN_TASKS"),
    ("optimlab.bench.tasks.gpt", "GPT_TASKS"),
]

_TASKS: dict[str, TaskSpec] | None = None
_USER_TASKS: dict[str, TaskSpec] = {}
_LOADED_REFERENCES: dict[str, list[str]] = {}
_ENTRY_POINTS_LOADED = False
_ENTRY_POINT_ERRORS: list[str] = []


def _registry() -> dict[str, TaskSpec]:
    global _TASKS
    if _TASKS is None:
        tasks: dict[str, TaskSpec] = {}
        for module_name, attribute in _PROVIDERS:
            for spec in getattr(importlib.import_module(module_name), attribute):
                tasks[spec.name] = spec
        _TASKS = tasks
    return _TASKS


def register_tasks(specs: Sequence[TaskSpec]) -> list[str]:
    """Make ``specs`` findable by :func:`get_task`; returns their names.

    A name already taken by a built-in task, or by a task from another source, raises :class:`TaskLoadError`;
    registering a task again from the same source replaces it (a reloaded file).
    """
    for spec in specs:
        if not isinstance(spec, TaskSpec):
            raise TaskLoadError(f"Invalid task: {spec!r} (accepted: TaskSpec)")
        key = spec.name.lower()
        taken = _registry().get(key) or _USER_TASKS.get(key)
        if taken is not None and taken.source != spec.source:
            raise TaskLoadError(f"{spec.source}: task name {spec.name!r} is already taken by {taken.source} "
                                "(rename the task)")
    for spec in specs:
        _USER_TASKS[spec.name.lower()] = spec
    return [spec.name for spec in specs]


def _cache_key(reference: str) -> str:
    """``reference``, plus the file's content hash for a task file (an edited file is imported again)."""
    where = reference.rpartition(":")[0]
    path = Path(where).expanduser()
    if where.endswith(".py") and path.is_file():
        return f"{path.resolve()}:{reference.rpartition(':')[2]}#{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return reference


def load_tasks(reference: str) -> list[str]:
    """Import a ``PATH.py:NAME`` / ``module:NAME`` reference (again only when a task file changed), register
    its tasks and return their names. Errors are :class:`TaskLoadError` with a one-line message."""
    key = _cache_key(reference)
    if key not in _LOADED_REFERENCES:
        _, specs = load_reference(reference)
        _LOADED_REFERENCES[key] = register_tasks(specs)
    return list(_LOADED_REFERENCES[key])


def resolve_task_names(items: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Command-line ``--task`` values → ``(task names, canonical references loaded)``.

    A value is a registered name or a reference (:func:`optimlab.bench.tasks.loader.is_reference`); each
    reference is loaded and contributes its tasks' names.
    """
    names: list[str] = []
    references: list[str] = []
    for item in items:
        if is_reference(item):
            loaded = load_tasks(item)
            names.extend(loaded)
            source = get_task(loaded[0]).source
            if source not in references:
                references.append(source)
        else:
            names.append(get_task(item).name)
    return tuple(dict.fromkeys(names)), tuple(references)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    specs, errors = entry_point_tasks()
    _ENTRY_POINT_ERRORS.extend(errors)
    for spec in specs:
        try:
            register_tasks([spec])
        except TaskLoadError as error:
            _ENTRY_POINT_ERRORS.append(str(error))


def all_tasks() -> tuple[list[TaskSpec], list[str]]:
    """Every task this process knows (built-in, loaded references, entry points) sorted by name, and one
    error line per entry point that failed to load."""
    _load_entry_points()
    specs = {**_registry(), **_USER_TASKS}
    return [specs[name] for name in sorted(specs)], list(_ENTRY_POINT_ERRORS)


def list_tasks(family: str | None = None) -> list[str]:
    """Sorted built-in task names; ``family="function"`` or ``"model"`` filters."""
    if family not in (None, "function", "model"):
        raise ValueError(f"Invalid family: {family!r} (accepted: None, 'function', 'model')")
    return sorted(name for name, spec in _registry().items() if family is None or spec.family == family)


def get_task(name: str) -> TaskSpec:
    """The task called ``name`` (built-in, loaded, or from an entry point); a reference
    (``PATH.py:NAME``) is loaded first and must hold exactly one task. An unknown name raises ``KeyError``
    listing the valid ones."""
    if is_reference(name):
        names = load_tasks(name)
        if len(names) != 1:
            raise TaskLoadError(f"{name}: holds {len(names)} tasks ({', '.join(names)}); name one of them")
        name = names[0]
    key = name.lower()
    for tasks in (_registry(), _USER_TASKS):
        if key in tasks:
            return tasks[key]
    _load_entry_points()
    if key in _USER_TASKS:
        return _USER_TASKS[key]
    tasks = {**_registry(), **_USER_TASKS}
    close = difflib.get_close_matches(key, tasks, n=2, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise KeyError(f"Unknown task {name!r}.{hint} Valid names: {', '.join(sorted(tasks))} "
                   "(or a task file: PATH.py:NAME, or package.module:NAME)")
