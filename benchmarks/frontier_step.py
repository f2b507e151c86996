"""Step time and state bytes of SOAP and Shampoo against pytorch-optimizer's and heavyball's, side by side.

For each shape set every implementation steps its own copy of the same float32 parameters with the same
gradients (four random sets, cycled). After a warm-up of ``FREQUENCY + 2`` steps (past Shampoo's start of
preconditioning; not timed), each round times one whole ``precondition_frequency`` cycle per implementation,
step by step, the implementations one after the other in an order rotated every round (interleaved). A
cycle of ``FREQUENCY`` consecutive steps holds exactly one preconditioner refresh (SOAP's QR, Shampoo's
inverse roots) for every implementation, so:

* *ms / step (cycle)*: the cycle's time divided by ``FREQUENCY`` (the amortised step, as in training);
* *refresh step*: the slowest step of the cycle (the one that refreshes the preconditioner);
* *plain step*: the median of the other steps;

each the median over the rounds; *speed vs fastest peer* divides the fastest other implementation's cycle
time by this one's. *state B / param* counts every tensor in the optimizer state after the run. The load
average (``os.getloadavg``) is recorded before and after each shape set: the machine may be shared.

Shape sets (``SETS``): the bench's char-GPT task model; one GPT-2-small transformer block (768 wide, 7.1M
parameters; the 124M model has 12 of them); a sixth of GPT-2 small's token embedding (8377 x 768: the whole
50257 x 768 matrix is too slow to step repeatedly on this machine's shared CPUs, and every implementation's
cost is linear in its rows: one-sided for SOAP, blocks for both Shampoos); the position embedding and
final norm. The rows *gpt2-small (124M, derived)* add each GPT-2 set times its multiplicity (12 blocks, 6 slices,
1), per implementation: times and state bytes are per tensor, so the sum is the whole model's (without
cache interference between tensors). Everything runs eagerly (heavyball's ``torch.compile`` is off: its
CPU compile takes minutes, and the optimlab rules are eager too).

Common settings: lr 3e-3, betas (0.95, 0.95), SOAP's factor decay 0.95, weight decay 0.01 (SOAP) / 0
(Shampoo), precondition frequency 10, no dimension merging. SOAP: largest rotated dimension 2048
(heavyball's default; 10000, pytorch-optimizer's and optimlab's, would make 2304- and 3072-sided factors):
a larger dimension keeps the identity (the block's 2304/3072 sides, the embedding's rows). Shampoo: blocks
of 1024 (optimlab's default), pytorch-optimizer's ``ScalableShampoo`` with RMSprop grafting (its closest to
Adam grafting; heavyball has no plain Shampoo) and every layer preconditioned (``UNLIMITED``), as here.

    OMP_NUM_THREADS=1 python benchmarks/frontier_step.py --out docs [--quick] [--rounds 3] [--sets char-gpt]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from optimlab.io import write_json_and_markdown
from optimlab.optim import SOAP, Shampoo

FREQUENCY = 10
MAX_DIM = 2048
SHAMPOO_BLOCK = 1024
GPT2_BLOCKS = 12
TOKEN_SLICES = 6
UNLIMITED = 1 << 30
"""pytorch-optimizer's ``ScalableShampoo`` limit on the largest dimension of a preconditioned layer (its
default, 8192, leaves GPT-2's token embedding unpreconditioned; optimlab's Shampoo blocks it instead)."""
LR = 3e-3


def gpt2_block_shapes(width: int = 768) -> list[tuple[int, ...]]:
    """The parameter shapes of one GPT-2 transformer block (HF ``Conv1D`` weights are (in, out))."""
    return [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,), (width,), (width,),
            (width, 4 * width), (4 * width,), (4 * width, width), (width,)]


def gpt2_token_embedding_slice(width: int = 768, vocab: int = 50257) -> list[tuple[int, ...]]:
    """A sixth of GPT-2 small's token embedding: ``ceil(50257 / 6)`` = 8377 rows of 768 (see ``SETS``)."""
    return [(-(-vocab // TOKEN_SLICES), width)]


def gpt2_other_shapes(width: int = 768, context: int = 1024) -> list[tuple[int, ...]]:
    """GPT-2 small's position embedding and final layer norm."""
    return [(context, width), (width,), (width,)]


def char_gpt_shapes() -> list[tuple[int, ...]]:
    """The trainable parameter shapes of the bench's char-GPT task model."""
    from optimlab.bench.tasks import get_task

    model = get_task("char-gpt").build(0).model
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


SETS: dict[str, tuple[Callable[[], list[tuple[int, ...]]], int | None]] = {
    "char-gpt": (char_gpt_shapes, None),
    "gpt2-small block": (gpt2_block_shapes, GPT2_BLOCKS),
    "gpt2-small token embedding / 6": (gpt2_token_embedding_slice, TOKEN_SLICES),
    "gpt2-small position embedding + final norm": (gpt2_other_shapes, 1),
}
"""label -> (shapes, how many times the set occurs in GPT-2 small's 124M parameters; ``None``: not part of it)."""
QUICK_SHAPES = [(12, 8), (8, 8), (8, 8), (8,), (40, 4)]


def implementations(frequency: int = FREQUENCY, max_dim: int = MAX_DIM,
                    block: int = SHAMPOO_BLOCK) -> dict[str, dict[str, Callable]]:
    """algorithm -> implementation name -> constructor(params)."""
    import heavyball
    import heavyball.utils
    import pytorch_optimizer as po
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    heavyball.utils.compile_mode = None  # eager (see the module docstring)
    soap = dict(lr=LR, betas=(0.95, 0.95), shampoo_beta=0.95, weight_decay=0.01, precondition_frequency=frequency)
    return {
        "SOAP": {
            "optimlab": lambda p: SOAP(p, **soap, max_precondition_dim=max_dim),
            "pytorch-optimizer": lambda p: po.SOAP(p, **soap, max_precondition_dim=max_dim),
            "heavyball": lambda p: heavyball.SOAP(p, **soap, max_precond_dim=max_dim, merge_dims=False,
                                                  use_precond_schedule=False),
        },
        "Shampoo": {
            "optimlab": lambda p: Shampoo(p, lr=LR, precondition_frequency=frequency, block_size=block),
            # its grafting choices: none, SGD, AdaGrad, RMSprop (Adam-like, no momentum), SQRTN
            "pytorch-optimizer": lambda p: po.ScalableShampoo(p, lr=LR, preconditioning_compute_steps=frequency,
                                                              start_preconditioning_step=frequency, block_size=block,
                                                              graft_type=LayerWiseGrafting.RMSPROP,
                                                              no_preconditioning_for_layers_with_dim_gt=UNLIMITED),
        },
    }


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (nested containers and objects included)."""
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if torch.is_tensor(value):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif hasattr(value, "__dict__"):  # pytorch-optimizer's preconditioner objects
            visit(vars(value))

    for state in optimizer.state.values():
        visit(state)
    return total


def _cycle_summary(cycles: list[list[float]]) -> dict[str, float]:
    """Medians over the rounds of the per-step cycle time, the slowest (refresh) step and the other steps."""
    per_step = [sum(cycle) / len(cycle) for cycle in cycles]
    refresh = [max(cycle) for cycle in cycles]
    plain = [statistics.median(sorted(cycle)[:-1]) if len(cycle) > 1 else cycle[0] for cycle in cycles]
    return {"ms_per_step": 1e3 * statistics.median(per_step), "refresh_ms": 1e3 * statistics.median(refresh),
            "plain_ms": 1e3 * statistics.median(plain)}


def measure(shapes: list[tuple[int, ...]], rounds: int, frequency: int = FREQUENCY, max_dim: int = MAX_DIM,
            algorithms: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per implementation of each algorithm: interleaved cycle timings and state bytes (module docstring)."""
    generator = torch.Generator().manual_seed(0)
    starts = [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) * 1e-2 for shape in shapes] for _ in range(4)]
    numel = sum(t.numel() for t in starts)
    rows = []
    for algorithm, impls in implementations(frequency, max_dim, min(max_dim, SHAMPOO_BLOCK)).items():
        if algorithms is not None and algorithm not in algorithms:
            continue
        runs = {}
        for name, make in impls.items():
            params = [torch.nn.Parameter(t.clone()) for t in starts]
            runs[name] = (params, make(params), [0])
            for _ in range(frequency + 2):  # warm-up: past the start of preconditioning
                _step(*runs[name], grads)
        cycles: dict[str, list[list[float]]] = {name: [] for name in runs}
        names = list(runs)
        for round_ in range(rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                cycles[name].append([_step(*runs[name], grads) for _ in range(frequency)])
        summaries = {name: _cycle_summary(values) for name, values in cycles.items()}
        for name, (params, optimizer, _) in runs.items():
            peers = [summaries[other]["ms_per_step"] for other in summaries if other != name]
            rows.append({"algorithm": algorithm, "implementation": name, **summaries[name],
                         "speed_vs_fastest_peer": min(peers) / summaries[name]["ms_per_step"] if peers else None,
                         "state_bytes": state_bytes(optimizer), "numel": numel,
                         "finite": all(bool(torch.isfinite(p).all()) for p in params)})
    return rows


def _step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, counter: list[int],
          grads: list[list[torch.Tensor]]) -> float:
    """Set the next gradients, time one ``optimizer.step()``; seconds."""
    for param, grad in zip(params, grads[counter[0] % len(grads)]):
        param.grad = grad
    counter[0] += 1
    tick = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - tick


def derived_gpt2(sets: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Whole-model rows: each GPT-2 set times its multiplicity (``SETS``), summed per implementation; empty
    unless every GPT-2 set was measured."""
    parts = {label: count for label, (_, count) in SETS.items() if count is not None}
    if not all(sets.get(label) for label in parts):
        return []
    keys = ("ms_per_step", "refresh_ms", "plain_ms", "state_bytes", "numel")
    rows = []
    for row in sets[next(iter(parts))]:
        same = [next(r for r in sets[label] if (r["algorithm"], r["implementation"]) ==
                     (row["algorithm"], row["implementation"])) for label in parts]
        rows.append({"algorithm": row["algorithm"], "implementation": row["implementation"],
                     **{key: sum(count * r[key] for count, r in zip(parts.values(), same)) for key in keys},
                     "finite": all(r["finite"] for r in same)})
    for row in rows:
        peers = [r["ms_per_step"] for r in rows if r["algorithm"] == row["algorithm"] and r is not row]
        row["speed_vs_fastest_peer"] = min(peers) / row["ms_per_step"] if peers else None
    return rows


def run(quick: bool = False, rounds: int = 3, sets: Iterable[str] | None = None,
        out: str | Path | None = None) -> dict[str, Any]:
    """Measure every shape set (``quick``: a few tiny matrices, frequency 3, one round: checks the plumbing);
    with ``out``, the files are written after each set (a long run leaves its finished sets behind)."""
    frequency, max_dim = (3, 8) if quick else (FREQUENCY, MAX_DIM)
    chosen = {"quick": lambda: QUICK_SHAPES} if quick else {name: SETS[name][0] for name in (sets or SETS)}
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                               "machine": platform.processor() or platform.machine(), "frequency": frequency,
                               "max_dim": max_dim, "block": min(max_dim, SHAMPOO_BLOCK),
                               "rounds": 1 if quick else rounds, "sets": {}, "load": {}}
    for label, shapes in chosen.items():
        before = os.getloadavg()[0]
        results["sets"][label] = measure(shapes(), results["rounds"], frequency, max_dim)
        results["load"][label] = [before, os.getloadavg()[0]]
        if out is not None:
            write(results, out)
    derived = derived_gpt2(results["sets"])
    if derived:
        results["sets"]["gpt2-small (124M, derived)"] = derived
    return results


def to_markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table, with the conditions."""
    lines = [f"Eager CPU step, {results['threads']} thread(s), torch {results['torch']}; precondition frequency "
             f"{results['frequency']}, SOAP's largest rotated dimension {results['max_dim']}, "
             f"Shampoo blocks {results['block']}; "
             f"{results['rounds']} interleaved round(s) of one cycle each, medians. Load average (1 min) before/after "
             "each set: " + ", ".join(f"{label} {a:.1f}/{b:.1f}" for label, (a, b) in results["load"].items()) + ".",
             "", "| shapes | algorithm | implementation | ms / step (cycle) | speed vs fastest peer | plain step (ms) | "
             "refresh step (ms) | state B / param |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for label, rows in results["sets"].items():
        for row in rows:
            ratio = "—" if row["speed_vs_fastest_peer"] is None else f"{row['speed_vs_fastest_peer']:.2f}x"
            lines.append(f"| {label} ({row['numel'] / 1e6:.2f}M) | {row['algorithm']} | {row['implementation']} | "
                         f"{row['ms_per_step']:.1f} | {ratio} | {row['plain_ms']:.1f} | {row['refresh_ms']:.1f} | "
                         f"{row['state_bytes'] / row['numel']:.1f} |")
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``frontier_step.json`` and ``frontier_step.md`` into ``out`` (atomically); return both paths."""
    return write_json_and_markdown(out, "frontier_step", results, to_markdown(results))


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out DIR [--quick] [--rounds N] [--sets a,b]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="folder for frontier_step.json/.md (default: docs)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: checks the plumbing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sets", default=None, help="comma-separated subset of: " + ", ".join(SETS))
    args = parser.parse_args(argv)
    sets = args.sets.split(",") if args.sets else None
    if sets is not None and set(sets) - set(SETS):
        parser.error(f"--sets: unknown set(s) {', '.join(sorted(set(sets) - set(SETS)))} (accepted: {', '.join(SETS)})")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1 (got {args.rounds})")
    results = run(args.quick, args.rounds, sets, args.out)
    print(to_markdown(results))
    print("wrote " + ", ".join(str(p) for p in write(results, args.out)))


if __name__ == "__main__":
    main()
