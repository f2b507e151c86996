"""Loading tasks from the user's code: ``PATH.py:NAME``, ``package.module:NAME`` and the entry-point
group ``optimlab.tasks``.

``NAME`` names a :class:`TaskSpec`, a list of them, or a zero-argument function returning either. Every
failure (missing file, missing name, wrong type, an exception while importing the user's file) is a
:class:`TaskLoadError` whose message is one line naming the file and the problem, raised before anything
is written anywhere.

Installed packages register tasks through the standard plugin mechanism, in their ``pyproject.toml``::

    [project.entry-points."optimlab.tasks"]
    my-tasks = "my_package.tasks:TASKS"

Each loaded task gets a :func:`fingerprint`: a hash of its settings and of the code it comes from (the
task file, or the files defining its callables, parsed so that comments and formatting do not count).
A bench stores it with the run and refuses to resume a run whose task has changed since.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from optimlab.bench.tasks.base import TaskSpec

__all__ = ["ENTRY_POINT_GROUP", "TaskLoadError", "check_task", "is_reference", "load_reference", "entry_point_tasks",
           "fingerprint"]

ENTRY_POINT_GROUP = "optimlab.tasks"
_OPTIMLAB_DIR = Path(__file__).resolve().parents[2]


class TaskLoadError(ValueError):
    """A task reference that cannot be loaded; the message is one line naming the file and the problem."""


def is_reference(text: str) -> bool:
    """Whether ``text`` is a ``PATH.py:NAME`` / ``module:NAME`` reference rather than a registered name."""
    return ":" in text or text.endswith(".py")


def _split(reference: str) -> tuple[str, str]:
    where, sep, name = reference.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise TaskLoadError(f"Invalid task reference {reference!r} (accepted: PATH.py:NAME or package.module:NAME, "
                            "NAME a TaskSpec, a list of them or a function returning either)")
    return where, name


def _user_frame_line(error: BaseException, path: Path) -> str:
    """``" (line N)"`` of the deepest traceback frame inside ``path``, or ``""``."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f" (line {error.lineno})"
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if Path(frame.filename).resolve() == path]
    return f" (line {lines[-1]})" if lines else ""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {text}"


def _import_file(path: Path, label: str) -> Any:
    if not path.is_file():
        raise TaskLoadError(f"task file {label}: no such file")
    module_name = "optimlab_user_tasks_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TaskLoadError(f"task file {label}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - any failure inside the user's file is reported, not raised
        del sys.modules[module_name]
        raise TaskLoadError(f"task file {label}: import failed{_user_frame_line(error, path)}: "
                            f"{_one_line(error)}") from None
    return module


def _import_module(module_name: str, label: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise TaskLoadError(f"task module {label}: no module named {error.name!r}") from None
        raise TaskLoadError(f"task module {label}: import failed: {_one_line(error)}") from None
    except Exception as error:  # noqa: BLE001
        raise TaskLoadError(f"task module {label}: import failed: {_one_line(error)}") from None


def _as_specs(value: Any, label: str, name: str, call: bool = True) -> list[TaskSpec]:
    """A TaskSpec, a non-empty list of them, or (once) a zero-argument function returning either."""
    if isinstance(value, TaskSpec):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, TaskSpec) for v in value):
        return list(value)
    if call and callable(value) and not isinstance(value, type):
        try:
            required = [p for p in inspect.signature(value).parameters.values()
                        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                                p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            required = []
        if required:
            raise TaskLoadError(f"{label}: {name} is a function with required arguments "
                                f"({', '.join(p.name for p in required)}); expected a TaskSpec, a list of them, or a "
                                "zero-argument function returning either")
        try:
            result = value()
        except Exception as error:  # noqa: BLE001
            raise TaskLoadError(f"{label}: calling {name}() failed: {_one_line(error)}") from None
        return _as_specs(result, label, f"{name}()", call=False)
    kind = "an empty list" if isinstance(value, (list, tuple)) and not value else f"a {type(value).__name__}"
    raise TaskLoadError(f"{label}: {name} is {kind}; expected a TaskSpec, a list of them, or a zero-argument "
                        "function returning either")


def _named(module: Any, name: str, label: str) -> Any:
    if not hasattr(module, name):
        found = sorted(k for k, v in vars(module).items()
                       if not k.startswith("_") and (isinstance(v, TaskSpec) or
                                                      (isinstance(v, (list, tuple)) and v and
                                                       all(isinstance(x, TaskSpec) for x in v))))
        hint = f" (task objects there: {', '.join(found)})" if found else ""
        raise TaskLoadError(f"{label}: no name {name!r}{hint}")
    return getattr(module, name)


def load_reference(reference: str) -> tuple[str, list[TaskSpec]]:
    """Import ``reference`` and return ``(canonical reference, its tasks)``; each task's ``source`` is the
    canonical reference (a file path made absolute, so a resume from another folder finds the same file)."""
    where, name = _split(reference)
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        label = where
        canonical = f"{path}:{name}"
        module = _import_file(path, label)
        label = f"task file {label}"
    else:
        canonical = reference
        module = _import_module(where, where)
        label = f"task module {where}"
    specs = _as_specs(_named(module, name, label), label, name)
    return canonical, [replace(spec, source=canonical) for spec in specs]


def entry_point_tasks() -> tuple[list[TaskSpec], list[str]]:
    """Every task registered in the ``optimlab.tasks`` entry-point group, and one error line per entry
    point that failed to load (a broken plugin does not hide the others)."""
    specs: list[TaskSpec] = []
    errors: list[str] = []
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        label = f"entry point {entry.name} ({entry.value})"
        try:
            value = entry.load()
        except Exception as error:  # noqa: BLE001
            errors.append(f"{label}: import failed: {_one_line(error)}")
            continue
        try:
            loaded = _as_specs(value, label, entry.value.rpartition(":")[2] or entry.name)
        except TaskLoadError as error:
            errors.append(str(error))
            continue
        specs.extend(replace(spec, source=f"entry point {entry.name}") for spec in loaded)
    return specs, errors


def _code_hash(path: Path) -> str:
    """A hash of the file's syntax tree (comments and formatting do not count); of its bytes if it does not parse."""
    data = path.read_bytes()
    try:
        data = ast.dump(ast.parse(data)).encode()
    except (SyntaxError, ValueError):
        pass
    return hashlib.sha256(data).hexdigest()


def _source_files(spec: TaskSpec) -> list[Path]:
    """The user files defining the task: the reference's file, and where its ``build`` (and, for
    :func:`optimlab.bench.tasks.make_task` tasks, each callable) is defined; optimlab's own files excluded."""
    functions: Iterable[Callable[..., Any]] = (spec.build, *getattr(spec.build, "task_callables", ()))
    files = set()
    where = spec.source.rpartition(":")[0]
    if where.endswith(".py") and Path(where).is_file():
        files.add(Path(where).resolve())
    for function in functions:
        try:
            name = inspect.getsourcefile(function)
        except TypeError:
            continue
        if name and Path(name).is_file():
            files.add(Path(name).resolve())
    return sorted(path for path in files if _OPTIMLAB_DIR not in path.parents)


def fingerprint(spec: TaskSpec) -> str:
    """A hash of what determines a task's results: its settings and the code of its source files."""
    settings = {key: getattr(spec, key) for key in ("name", "metric", "mode", "target", "steps", "quick_steps",
                                                     "eval_every", "family", "lr_widen", "deterministic")}
    payload = json.dumps({"settings": settings, "code": [_code_hash(p) for p in _source_files(spec)]},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_task(spec: TaskSpec, device: str = "cpu") -> None:
    """Build ``spec`` once (seed 0) and check its contract: one batch gives a scalar loss tensor and
    ``evaluate()`` returns a dict holding ``spec.metric``. Any failure is a one-line :class:`TaskLoadError`
    naming the task's source."""
    where = f"{spec.source}: task {spec.name!r}"
    try:
        instance = spec.instantiate(0, device)
    except ValueError as error:
        if "Invalid device" in str(error):
            raise TaskLoadError(f"{where}: {error}") from None
        raise TaskLoadError(f"{where}: build(0) failed: {_one_line(error)}") from None
    except Exception as error:  # noqa: BLE001
        raise TaskLoadError(f"{where}: build(0) failed: {_one_line(error)}") from None
    for stage, run in (("loss", lambda: instance.loss(next(instance.batches))), ("evaluate", instance.evaluate)):
        try:
            value = run()
        except Exception as error:  # noqa: BLE001
            raise TaskLoadError(f"{where}: {stage} failed: {_one_line(error)}") from None
        if stage == "loss" and not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise TaskLoadError(f"{where}: the loss is {type(value).__name__}"
                                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}; "
                                "expected a scalar tensor")
        if stage == "evaluate":
            if not isinstance(value, dict):
                raise TaskLoadError(f"{where}: evaluate returned {type(value).__name__}; expected a dict of metrics")
            if spec.metric not in value:
                raise TaskLoadError(f"{where}: evaluate returned no {spec.metric!r} (its metric); keys: "
                                    f"{', '.join(map(str, value)) or 'none'}")
