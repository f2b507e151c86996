"""The benchmark lab: test functions, tasks, a tuned runner, a SQLite store, and HTML reports.

Submodules are imported on demand (``optimlab.bench.problems``, ``optimlab.bench.tasks``,
``optimlab.bench.runner``, ...), so importing this package stays cheap.
"""

from optimlab.bench.problems import Problem, get_problem, list_problems

__all__ = ["Problem", "get_problem", "list_problems"]
