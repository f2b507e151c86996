"""Memory per rank and throughput of the three data-parallel strategies: DDP, ZeRO-1 and FSDP2 (issue 16).

    python benchmarks/parallel_memory.py [--quick] [--out docs]   # or: benchmarks/run_all.py --only parallel_memory

For 1, 2 and 4 CPU processes (gloo; one ``torch.distributed.run`` launch per process count and strategy, so each
process's peak memory is its strategy's alone), the trainer's GPT scaled up (8 blocks of width 512, 8 heads,
context 64, 96 characters: 25.3M parameters) is trained with optimlab's AdamW on a global batch of 8 sequences
(8/W per rank):

* **DDP** (``DistributedDataParallel``, ``gradient_as_bucket_view=True`` so that the gradients *are* its
  communication buckets, no second copy): every rank holds everything.
* **ZeRO-1** (``torch.distributed.optim.ZeroRedundancyOptimizer``): the optimizer state is partitioned, whole
  tensors per rank; parameters and gradients stay whole.
* **FSDP2** (``fully_shard`` per block, then the root): parameters, gradients and optimizer state are sharded
  (``Shard(0)``), each rank holding 1/W of every tensor; a block is gathered only around its forward/backward.

Memory is **measured from the tensors** after a step (before ``zero_grad``): the bytes of this rank's parameters,
gradients and optimizer-state tensors (``to_local()`` of a DTensor: its shard; the tied embedding counted once).
The *expected* bytes are derived from the one-process measurement (P, G, S: parameters, gradients, state): DDP
P + G + S; ZeRO-1 P + G + S/W; FSDP2 (P + G + S)/W. Beside them, the process's peak resident set (``ru_maxrss``):
everything, i.e. the Python/torch runtime (about 300 MiB), the activations (the per-rank batch is 8/W sequences)
and the transient buffers (FSDP2's gathered blocks and unsharded gradients before the reduce-scatter, DDP's and
gloo's copies); under FSDP2 the model is built on the meta device and each rank materialises only its shards, as
large models must be.
Tokens/s: the global batch's tokens over the median wall time of the timed steps (rank 0, after a barrier), one
warm-up step first; each process runs one intra-op thread (two threads in one process on this shared 2-core machine
ran several times slower than one, see train.md), so W processes use up to W cores: compare strategies at the same
W, not W against W.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from optimlab.io import write_json_and_markdown

SRC = Path(__file__).resolve().parents[1] / "src"
STRATEGIES = ("ddp", "zero1", "fsdp2")
WORLD_SIZES = (1, 2, 4)
FULL = {"n_layer": 8, "n_head": 8, "n_embd": 512, "block_size": 64, "vocab_size": 96, "global_batch": 8,
        "timed_steps": 3}
QUICK = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 96, "global_batch": 8,
         "timed_steps": 1}
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------- one rank

def _bytes(tensors: Any) -> int:
    from optimlab.optim._dtensor import local

    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        shard = local(tensor)
        total += shard.numel() * shard.element_size()
    return total


def _state_tensors(optimizer: Any) -> list[Any]:
    import torch

    local_optimizer = getattr(optimizer, "optim", optimizer)  # ZeRO: this rank's partition's optimizer
    return [value for state in local_optimizer.state.values() for value in state.values()
            if isinstance(value, torch.Tensor)]


def _initialise_shards(model: Any) -> None:
    """GPT's initialisation, drawn per shard (the values need not match an unsharded model's: only memory and
    speed are measured): N(0, 0.02) for matrices and embeddings, 1 for LayerNorm weights, 0 for biases."""
    import torch

    from optimlab.optim._dtensor import local

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            shard = local(parameter)
            if name.endswith("bias"):
                shard.zero_()
            elif parameter.dim() == 1:
                shard.fill_(1.0)
            else:
                shard.normal_(0.0, 0.02)


def _measure(strategy: str, shape: dict[str, Any]) -> dict[str, Any]:
    """Train the model under ``strategy`` for 1 + timed steps; this rank's bytes and rank 0's step times."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from optimlab.optim.groups import param_groups
    from optimlab.optim.registry import create_optimizer, get_spec
    from optimlab.train.model import GPT, GPTConfig

    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    config = GPTConfig(vocab_size=shape["vocab_size"], block_size=shape["block_size"], n_layer=shape["n_layer"],
                       n_head=shape["n_head"], n_embd=shape["n_embd"])
    if strategy == "fsdp2":  # built on the meta device, sharded, then each rank materialises its shards only
        with torch.device("meta"):
            model = GPT(config)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device="cpu")
        _initialise_shards(model)
    else:
        model = GPT(config)
    parameter_count = model.num_parameters()
    forward: torch.nn.Module = model
    if strategy == "ddp":
        forward = DistributedDataParallel(model, gradient_as_bucket_view=True)
    groups = param_groups(model, 0.1, lr=1e-3)
    if strategy == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer: Any = ZeroRedundancyOptimizer(groups, optimizer_class=get_spec("adamw").resolve(), lr=1e-3)
    else:
        optimizer = create_optimizer(groups, "adamw", lr=1e-3)
    share = shape["global_batch"] // world_size
    times = []
    for step in range(1 + shape["timed_steps"]):
        tokens = torch.randint(0, shape["vocab_size"], (shape["global_batch"], shape["block_size"] + 1),
                               generator=torch.Generator().manual_seed(step))[rank * share:(rank + 1) * share]
        dist.barrier()
        began = time.perf_counter()
        optimizer.zero_grad()
        _, loss = forward(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        dist.barrier()
        if step > 0:
            times.append(time.perf_counter() - began)
    return {"strategy": strategy, "rank": rank, "parameters": parameter_count,
            "param_bytes": _bytes(model.parameters()), "grad_bytes": _bytes(p.grad for p in model.parameters()),
            "state_bytes": _bytes(_state_tensors(optimizer)),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "step_s": times}


def worker(result: Path, strategy: str, quick: bool) -> None:
    """One rank of one strategy's run; rank 0 writes all ranks' measurements to ``result``."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, _measure(strategy, QUICK if quick else FULL))
    if dist.get_rank() == 0:
        result.write_text(json.dumps(rows))
    dist.barrier()
    # no destroy_process_group: gloo's teardown aborted one rank of four here ("terminate called without an active
    # exception", after the results were written; see optimlab.train.distributed.shutdown); leave at once instead
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------- the run

def _launch(world_size: int, strategy: str, quick: bool, folder: Path) -> list[dict[str, Any]]:
    result = folder / f"{strategy}-{world_size}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
               str(Path(__file__).resolve()), "--worker", str(result), "--strategy", strategy,
               *(["--quick"] if quick else [])]
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if job.returncode != 0:
        raise RuntimeError(f"parallel_memory: the {world_size}-process {strategy} run failed:\n{job.stderr[-3000:]}")
    return json.loads(result.read_text())


def _load() -> str:
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def run(quick: bool = False) -> dict[str, Any]:
    """Measure every (process count, strategy); returns the rows (one per configuration, per-rank values as
    lists) with the expected bytes, and the conditions of the run."""
    load_before = _load()
    with tempfile.TemporaryDirectory() as scratch:
        measured = {(world_size, strategy): _launch(world_size, strategy, quick, Path(scratch))
                    for world_size in WORLD_SIZES for strategy in STRATEGIES}
    shape = QUICK if quick else FULL
    single = measured[1, "ddp"][0]
    whole = {key: single[key] for key in ("param_bytes", "grad_bytes", "state_bytes")}
    rows = []
    for world_size in WORLD_SIZES:
        for strategy in STRATEGIES:
            mine = measured[world_size, strategy]
            expected = _expected(strategy, world_size, whole)
            step_s = statistics.median(mine[0]["step_s"])
            rows.append({
                "world_size": world_size, "strategy": strategy,
                **{key: [r[key] for r in mine] for key in ("param_bytes", "grad_bytes", "state_bytes",
                                                           "peak_rss_bytes")},
                "expected_param_bytes": expected[0], "expected_grad_bytes": expected[1],
                "expected_state_bytes": expected[2], "step_s": step_s,
                "tokens_per_s": shape["global_batch"] * shape["block_size"] / step_s,
            })
    return {"shape": shape, "parameters": single["parameters"], "cores": os.cpu_count(),
        "load_before": load_before, "load_after": _load(), "quick": quick,
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}


def _expected(strategy: str, world_size: int, whole: dict[str, int]) -> tuple[float, float, float]:
    params, grads, state = whole["param_bytes"], whole["grad_bytes"], whole["state_bytes"]
    if strategy == "ddp":
        return params, grads, state
    if strategy == "zero1":
        return params, grads, state / world_size
    return params / world_size, grads / world_size, state / world_size


def to_markdown(results: dict[str, Any]) -> str:
    """The table (per rank: the largest rank's bytes; the range when the ranks differ) and the conditions."""
    shape = results["shape"]
    lines = [
        f"Model: the trainer's GPT, {shape['n_layer']} blocks, width {shape['n_embd']}, {shape['n_head']} heads, "
        f"context {shape['block_size']}, vocabulary {shape['vocab_size']}: {results['parameters']:,} parameters; "
        f"optimlab AdamW (8 B of state per parameter); global batch {shape['global_batch']} sequences. "
        f"Measured {results['measured_at']} on {results['cores']} shared CPU cores (load average "
        f"{results['load_before']} before, {results['load_after']} after; 1/5/15 min), gloo, one intra-op thread per "
        "process" + (" (--quick: a tiny model, plumbing only)" if results["quick"] else "") + ".",
        "",
        "| processes | strategy | params MiB/rank | grads MiB/rank | state MiB/rank | state expected | "
        "P+G+S MiB/rank | P+G+S expected | measured/expected | peak RSS MiB/rank | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for row in results["rows"]:
        total = [p + g + s for p, g, s in zip(row["param_bytes"], row["grad_bytes"], row["state_bytes"])]
        expected_total = row["expected_param_bytes"] + row["expected_grad_bytes"] + row["expected_state_bytes"]
        lines.append(
            f"| {row['world_size']} | {row['strategy']} | {_mib(row['param_bytes'])} | {_mib(row['grad_bytes'])} | "
            f"{_mib(row['state_bytes'])} | {row['expected_state_bytes'] / MIB:.1f} | {_mib(total)} | "
            f"{expected_total / MIB:.1f} | {max(total) / expected_total:.3f} | {_mib(row['peak_rss_bytes'])} | "
            f"{row['tokens_per_s']:,.0f} |")
        ratios.append(max(total) / expected_total)
    lines += ["", f"Largest rank's parameters + gradients + state against the expected bytes: {min(ratios):.4f} to "
              f"{max(ratios):.4f} over the {len(ratios)} configurations."]
    return "\n".join(lines) + "\n"


def _mib(values: list[int]) -> str:
    low, high = min(values) / MIB, max(values) / MIB
    return f"{high:.1f}" if high - low < 0.05 else f"{low:.1f}–{high:.1f}"


def write(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``parallel_memory.json`` and ``parallel_memory.md`` in ``out``."""
    markdown = "# Memory per rank: DDP, ZeRO-1, FSDP2\n\n" + (__doc__ or "").split("\n\n", 2)[2] + "\n" + \
        to_markdown(results)
    return write_json_and_markdown(out, "parallel_memory", results, markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Memory per rank and tokens/s of DDP, ZeRO-1 and FSDP2")
    parser.add_argument("--quick", action="store_true", help="a tiny model: checks the plumbing")
    parser.add_argument("--out", default="docs", help="folder for parallel_memory.json / .md")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.strategy, args.quick)
        return
    results = run(args.quick)
    print(to_markdown(results))
    print(write(results, args.out)[1])


if __name__ == "__main__":
    main()
