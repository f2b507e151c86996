"""The benchmark lab: test functions, tasks, a tuned runner, a SQLite store, and HTML reports.

Submodules are imported on demand (``optimlab.bench.problems``, ``optimlab.bench.tasks``,
``optimlab.bench.runner``, ...), so importing this package stays cheap. ``from optimlab.bench import
compare`` is the in-process API (:mod:`optimlab.bench.api`).
"""

from typing import Any

from optimlab.bench.problems import Problem, get_problem, list_problems

__all__ = ["Problem", "compare", "get_problem", "list_problems"]


def __getattr__(name: str) -> Any:
    if name == "compare":
        from optimlab.bench.api import compare

        return compare
    raise AttributeError(f"module 'optimlab.bench' has no attribute {name!r}")
