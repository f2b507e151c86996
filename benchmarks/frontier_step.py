"""Step time and state bytes of SOAP and Shampoo against pytorch-optimizer's and heavyball's, side by side.

For each shape set, every implementation gets the same float32 parameters and gradients; after a warm-up of
``precondition_frequency + 2`` steps (past Shampoo's start of preconditioning; excluded), rounds of ``precondition_frequency`` steps (each
block holds exactly one preconditioner refresh, so the per-step time is amortised as in training) are
timed round-robin, implementation after implementation, and the median block per step is reported with
its ratio to the fastest peer of the same algorithm. State bytes per parameter count every tensor in the
optimizer state after the warm-up. All run eagerly on the CPU here (heavyball's ``torch.compile`` is turned
off: the CPU compile of its graphs takes minutes, and the optimlab rules are eager too).

Shape sets: one transformer block of GPT-2 small (768 wide; 7.1M parameters: the 124M model is 12 of them
plus the embeddings, too slow to step repeatedly on this machine's shared CPUs) and the bench's char-GPT
task model. Common settings: lr 3e-3, precondition frequency 10, largest preconditioned dimension 2048
(heavyball's default; pytorch-optimizer's and optimlab's 10000 would eigendecompose 3072 x 3072 factors),
no dimension merging.

    OMP_NUM_THREADS=1 python benchmarks/frontier_step.py --out docs --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from optimlab.io import atomic_write_text
from optimlab.optim import SOAP, Shampoo

FREQUENCY = 10
MAX_DIM = 2048


def gpt2_block_shapes(width: int = 768) -> list[tuple[int, ...]]:
    """The parameter shapes of one GPT-2 transformer block (Conv1D weights are (in, out))."""
    return [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,), (width,), (width,),
            (width, 4 * width), (4 * width,), (4 * width, width), (width,)]


def char_gpt_shapes() -> list[tuple[int, ...]]:
    """The trainable parameter shapes of the bench's char-GPT task model."""
    from optimlab.bench.tasks import get_task

    model = get_task("char-gpt").build(0).model
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def implementations() -> dict[str, dict[str, Callable]]:
    """algorithm -> implementation name -> constructor(params)."""
    import heavyball
    import heavyball.utils
    import pytorch_optimizer as po
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    heavyball.utils.compile_mode = None  # eager (see the module docstring)
    return {
        "SOAP": {
            "optimlab": lambda p: SOAP(p, lr=3e-3, precondition_frequency=FREQUENCY, max_precondition_dim=MAX_DIM),
            "pytorch-optimizer": lambda p: po.SOAP(p, lr=3e-3, precondition_frequency=FREQUENCY,
                                                   max_precondition_dim=MAX_DIM),
            "heavyball": lambda p: heavyball.SOAP(p, lr=3e-3, precondition_frequency=FREQUENCY, max_precond_dim=MAX_DIM,
                                                  merge_dims=False, use_precond_schedule=False),
        },
        "Shampoo": {
            "optimlab": lambda p: Shampoo(p, lr=3e-3, precondition_frequency=FREQUENCY, block_size=MAX_DIM),
            # its grafting choices: none, SGD, AdaGrad, RMSprop (Adam-like, no momentum), SQRTN
            "pytorch-optimizer": lambda p: po.ScalableShampoo(p, lr=3e-3, preconditioning_compute_steps=FREQUENCY,
                                                              start_preconditioning_step=FREQUENCY, block_size=MAX_DIM,
                                                              graft_type=LayerWiseGrafting.RMSPROP),
        },
    }


def state_bytes(optimizer: torch.optim.Optimizer, numel: int) -> float:
    total = 0

    def visit(value) -> None:
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
    return total / numel


def measure(shapes: list[tuple[int, ...]], rounds: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    starts = [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) * 1e-2 for shape in shapes] for _ in range(4)]
    numel = sum(t.numel() for t in starts)
    rows = []
    for algorithm, impls in implementations().items():
        runs = {}
        for name, make in impls.items():
            params = [torch.nn.Parameter(t.clone()) for t in starts]
            optimizer = make(params)
            runs[name] = (params, optimizer, [0])
            for _ in range(FREQUENCY + 2):  # warm-up: past the start of preconditioning
                _step(params, optimizer, grads, runs[name][2])
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (params, optimizer, counter) in runs.items():
                tick = time.perf_counter()
                for _ in range(FREQUENCY):
                    _step(params, optimizer, grads, counter)
                seconds[name].append((time.perf_counter() - tick) / FREQUENCY)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        for name, (params, optimizer, _) in runs.items():
            peers = [medians[other] for other in medians if other != name]
            rows.append({"algorithm": algorithm, "implementation": name, "ms_per_step": 1e3 * medians[name],
                         "speed_vs_fastest_peer": (min(peers) / medians[name]) if peers else None,
                         "state_bytes_per_param": state_bytes(optimizer, numel), "numel": numel})
            print(rows[-1], flush=True)
    return rows


def _step(params, optimizer, grads, counter) -> None:
    for param, grad in zip(params, grads[counter[0] % len(grads)]):
        param.grad = grad
    optimizer.step()
    counter[0] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "frequency": FREQUENCY, "max_dim": MAX_DIM, "sets": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for label, shapes in (("char-gpt", char_gpt_shapes()), ("gpt2-small block", gpt2_block_shapes())):
        results["sets"][label] = measure(shapes, args.rounds)
        lines = ["| shapes | algorithm | implementation | ms / step | speed vs fastest peer | state B / param |",
                 "|---|---|---|---|---|---|"]
        for name, rows in results["sets"].items():
            for row in rows:
                ratio = "—" if row["speed_vs_fastest_peer"] is None else f"{row['speed_vs_fastest_peer']:.2f}x"
                lines.append(f"| {name} ({row['numel'] / 1e6:.2f}M) | {row['algorithm']} | {row['implementation']} | "
                             f"{row['ms_per_step']:.1f} | {ratio} | {row['state_bytes_per_param']:.1f} |")
        # written after each shape set, so a long run leaves its finished sets behind
        atomic_write_text(args.out / "frontier_step.json", json.dumps(results, indent=2))
        atomic_write_text(args.out / "frontier_step.md", "\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
