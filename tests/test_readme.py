"""The README's tour is code users will paste: it must run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs_and_trains():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    opt, sched = namespace["opt"], namespace["sched"]
    assert sched.last_epoch == 100
    # the warmup-cosine schedule ended below its peak, and the optimizer really moved the weights
    assert opt.param_groups[0]["lr"] < 3e-4
    assert all(opt.state[p]["step"] == 100 for p in namespace["model"].parameters())
