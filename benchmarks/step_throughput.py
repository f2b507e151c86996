"""Optimizer step throughput: optimlab against torch.optim and peer packages, side by side.

For each algorithm, every implementation (optimlab's fused and foreach paths; torch's fused, foreach
and for-loop versions where torch has the algorithm; ``pytorch-optimizer``, ``lion-pytorch``,
``schedulefree`` and ``heavyball`` where they have it) steps the *same* parameters and gradients.
Implementations are interleaved: each round times a few steps of every implementation, in an order
rotated from round to round, so that load changes on a shared machine hit every implementation alike;
the median step time over all rounds is reported.

Reported per implementation: G parameters/s, ms/step, state bytes/parameter, the bytes a step must
move (``2 * param + grad + 2 * state`` per parameter: every value read once, parameter and state
written once), the fraction of the streaming bandwidth that this represents (the bandwidth is measured
in the same run by an in-place ``a += b`` stream before each configuration; the peak is used), and for compiled paths the first-call compile time.

    python benchmarks/step_throughput.py --out docs [--quick] [--sizes 1M,20M] [--algorithms adamw,lion]

``run(...)`` returns the results as a dict; :func:`to_markdown` renders them; ``benchmarks/run_all.py``
combines them into ``docs/perf.md``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optimlab.io import write_json_and_markdown
from optimlab.optim import create_optimizer, state_bytes_per_param
from optimlab.optim._fused import compile_stats
from optimlab.progress import progress

Builder = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

# name: (total parameters, number of tensors); every tensor is 2-D with rows of ``ROW`` values (or 8 x 8 when small).
SIZES: dict[str, tuple[int, int]] = {
    "gpt2-small": (124_439_808, 148),
    "1M": (1_000_000, 100),
    "20M": (20_000_000, 100),
    "200M": (200_000_000, 100),
    "10k-small": (640_000, 10_000),
    "1.3B": (1_300_000_000, 200),  # a GPU size (``--device cuda``): not in the CPU plan
}
QUICK_SIZES: dict[str, tuple[int, int]] = {"tiny": (20_000, 10), "tiny-small": (6_400, 100)}
SMALL_TENSOR_SIZES = ("10k-small", "tiny-small")  # the per-tensor-overhead cases (targets against torch fused/foreach)
ROW = 1000


def gpt2_small_shapes(vocab: int = 50257, context: int = 1024, width: int = 768, layers: int = 12
                      ) -> list[tuple[int, ...]]:
    """The parameter shapes of GPT-2 small (Radford et al. 2019; Hugging Face's layout, tied output embedding):
    148 tensors, 124,439,808 values."""
    block = [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,), (width,), (width,),
             (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return [(vocab, width), (context, width), *block * layers, (width,), (width,)]


# sizes given by their shapes rather than by (total, count)
SHAPES: dict[str, Callable[[], list[tuple[int, ...]]]] = {"gpt2-small": gpt2_small_shapes}


@dataclass
class Impl:
    """One implementation of an algorithm: ``source`` is optimlab, torch or the peer package's name."""

    label: str
    source: str
    build: Builder
    compiles: bool = False
    sizes: tuple[str, ...] | None = None  # run only at these sizes (None: all)


@dataclass
class Algorithm:
    """An algorithm and its implementations. ``elementwise``: its step streams memory (bandwidth target applies)."""

    name: str
    impls: list[Impl] = field(default_factory=list)
    elementwise: bool = True
    target: str = "3x"  # "torch-fused" (>= 1.0x torch's fused step) or "3x" (>= 3x the best other implementation)
    sizes: tuple[str, ...] | None = None  # run only at these sizes (None: every size of the plan)


def _accepts(name: str, argument: str) -> bool:
    import inspect

    from optimlab.optim import get_spec

    return argument in inspect.signature(get_spec(name).resolve().__init__).parameters


def _optimlab(name: str, fused: bool, **kwargs: Any) -> list[Impl]:
    """optimlab's fused or multi-tensor implementation of registry entry ``name`` ([] when it has no such path)."""
    if fused and not _accepts(name, "fused"):
        return []
    label = "optimlab fused" if fused else ("optimlab foreach" if _accepts(name, "foreach") else "optimlab")
    if fused:
        kwargs = dict(kwargs, fused=True)
    elif _accepts(name, "foreach"):
        kwargs = dict(kwargs, foreach=True)
    return [Impl(label, "optimlab", lambda ps: create_optimizer(ps, name, **kwargs), compiles=fused)]


def _own_copy(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the shared parameters with copies of their gradients: flat mode re-points the parameters it is
    given into its buffers, which must not move the tensors the other implementations step."""
    copies = []
    for param in params:
        copy = param.detach().clone()
        copy.grad = param.grad.detach().clone()
        copies.append(copy)
    return copies


def _optimlab_flat(name: str, **kwargs: Any) -> list[Impl]:
    """optimlab's flat-buffer mode (``flatten_parameters``) with the fused step, on its own copy of the parameters."""
    from optimlab.optim import flatten_parameters

    return [Impl("optimlab flat", "optimlab",
                 lambda ps: flatten_parameters(create_optimizer(_own_copy(ps), name, fused=True, **kwargs)),
                 compiles=True)]


def _optimlab_default(name: str, **kwargs: Any) -> list[Impl]:
    """optimlab with no ``foreach``/``fused`` argument: the path its default picks for these tensors."""
    return [Impl("optimlab default", "optimlab", lambda ps: create_optimizer(ps, name, **kwargs))]


def _torch(cls_name: str, **kwargs: Any) -> list[Impl]:
    cls = getattr(torch.optim, cls_name)
    impls = [
        Impl("torch for-loop", "torch", lambda ps: cls(ps, foreach=False, **kwargs)),
        Impl("torch foreach", "torch", lambda ps: cls(ps, foreach=True, **kwargs)),
    ]
    if cls_name in ("Adam", "AdamW", "SGD", "Adagrad"):
        impls.append(Impl("torch fused", "torch", lambda ps: cls(ps, fused=True, **kwargs)))
    return impls


def _peer(label: str, module: str, attr: str, setup: Callable[[Any], None] | None = None, **kwargs: Any) -> Impl:
    def build(ps: list[torch.Tensor]) -> torch.optim.Optimizer:
        import importlib

        optimizer = getattr(importlib.import_module(module), attr)(ps, **kwargs)
        if setup is not None:
            setup(optimizer)
        return optimizer

    # heavyball compiles its own step (about a minute per configuration here): measured at 20M only
    heavy = module == "heavyball"
    return Impl(label, module.split(".")[0], build, compiles=heavy, sizes=("20M",) if heavy else None)


def _train_mode(optimizer: Any) -> None:
    optimizer.train()


def algorithms(include_compiled: bool = True) -> dict[str, Algorithm]:
    """The benchmark's table: algorithm name -> implementations (compiled ones left out when asked)."""
    table = {
        "adamw": Algorithm("adamw", [*_optimlab_flat("adamw"), *_optimlab("adamw", True), *_optimlab("adamw", False),
                                     *_optimlab_default("adamw"), *_torch("AdamW", lr=1e-3),
                                     _peer("heavyball AdamW", "heavyball", "AdamW", lr=1e-3)], target="torch-fused"),
        "adam": Algorithm("adam", [*_optimlab_flat("adam"), *_optimlab("adam", True), *_optimlab("adam", False),
                                   *_optimlab_default("adam"), *_torch("Adam", lr=1e-3)],
                          target="torch-fused"),
        "sgd-momentum": Algorithm("sgd-momentum", [*_optimlab_flat("sgd-momentum"), *_optimlab("sgd-momentum", True),
                                                   *_optimlab("sgd-momentum", False), *_optimlab_default("sgd-momentum"),
                                                   *_torch("SGD", lr=1e-2, momentum=0.9)], target="torch-fused"),
        "lion": Algorithm("lion", [*_optimlab("lion", True), *_optimlab("lion", False),
                                   _peer("lion-pytorch", "lion_pytorch", "Lion", lr=1e-4, use_triton=False),
                                   _peer("pytorch-optimizer Lion", "pytorch_optimizer", "Lion", lr=1e-4)]),
        "lamb": Algorithm("lamb", [*_optimlab("lamb", True), *_optimlab("lamb", False),
                                   _peer("pytorch-optimizer Lamb", "pytorch_optimizer", "Lamb", lr=1e-3)],
                          elementwise=False),
        "schedule-free-adamw": Algorithm("schedule-free-adamw", [
            *_optimlab("schedule-free-adamw", True), *_optimlab("schedule-free-adamw", False),
            _peer("schedulefree AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", _train_mode, lr=1e-3),
            _peer("heavyball SFAdamW", "heavyball", "SFAdamW", lr=1e-3)]),
        "adafactor": Algorithm("adafactor", [*_optimlab("adafactor", True), *_optimlab("adafactor", False),
                                             Impl("torch for-loop", "torch",
                                                  lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=False)),
                                             _peer("pytorch-optimizer AdaFactor", "pytorch_optimizer", "AdaFactor",
                                                   lr=1e-2)], elementwise=False),
        "nadam": Algorithm("nadam", [*_optimlab("nadam", True), *_optimlab("nadam", False), *_torch("NAdam", lr=2e-3),
                                     _peer("pytorch-optimizer NAdam", "pytorch_optimizer", "NAdam", lr=2e-3)]),
        "radam": Algorithm("radam", [*_optimlab("radam", True), *_optimlab("radam", False), *_torch("RAdam", lr=1e-3),
                                     _peer("pytorch-optimizer RAdam", "pytorch_optimizer", "RAdam", lr=1e-3)]),
        "adagrad": Algorithm("adagrad", [*_optimlab("adagrad", True), *_optimlab("adagrad", False),
                                         *_torch("Adagrad", lr=1e-2)]),
        "rmsprop": Algorithm("rmsprop", [*_optimlab("rmsprop", True), *_optimlab("rmsprop", False),
                                         *_torch("RMSprop", lr=1e-3)]),
        "adamax": Algorithm("adamax", [*_optimlab("adamax", True), *_optimlab("adamax", False),
                                       *_torch("Adamax", lr=2e-3),
                                       _peer("pytorch-optimizer AdaMax", "pytorch_optimizer", "AdaMax", lr=2e-3)]),
        "lars": Algorithm("lars", [*_optimlab("lars", True), *_optimlab("lars", False),
                                   _peer("pytorch-optimizer LARS", "pytorch_optimizer", "LARS", lr=1e-2)],
                          elementwise=False),
        # Newton-Schulz orthogonalisation is matmul-bound (about 1 GFLOP per 200 x 1000 matrix): 1M parameters only
        "muon": Algorithm("muon", [*_optimlab("muon", True), *_optimlab("muon", False),
                                   Impl("torch for-loop", "torch", lambda ps: torch.optim.Muon(ps, lr=2e-2))],
                          elementwise=False, sizes=("1M",)),
        "adadelta": Algorithm("adadelta", [*_optimlab("adadelta", True), *_optimlab("adadelta", False),
                                           *_torch("Adadelta", lr=1.0)]),
        "adamw-bf16-state": Algorithm("adamw-bf16-state", [
            *_optimlab("adamw", True, state_dtype="bfloat16"), *_optimlab("adamw", False, state_dtype="bfloat16"),
            *[impl for impl in _torch("AdamW", lr=1e-3) if impl.label == "torch fused"]], target="lowp-1.2"),
        "adamw-int8-state": Algorithm("adamw-int8-state", [
            *_optimlab("adamw", True, state_dtype="int8"), *_optimlab("adamw", False, state_dtype="int8"),
            *[impl for impl in _torch("AdamW", lr=1e-3) if impl.label == "torch fused"]], target="lowp-1.0"),
    }
    if not include_compiled:
        for algorithm in table.values():
            algorithm.impls = [impl for impl in algorithm.impls if not impl.compiles]
    return table


def make_params(total: int, count: int, dtype: torch.dtype, seed: int = 0,
                shapes: list[tuple[int, ...]] | None = None, device: str = "cpu") -> list[torch.Tensor]:
    """``count`` 2-D tensors holding ``total`` values in all (or tensors of the given ``shapes``) on ``device``,
    each with a random gradient attached."""
    generator = torch.Generator(device).manual_seed(seed)
    per_tensor = max(total // count, 1)
    shape = (max(per_tensor // ROW, 1), ROW) if per_tensor >= ROW else (8, max(per_tensor // 8, 1))
    params = []
    for shape in shapes or [shape] * count:
        param = torch.randn(shape, generator=generator, device=device).to(dtype)
        param.grad = (torch.randn(shape, generator=generator, device=device) * 1e-2).to(dtype)
        params.append(param)
    return params


def _synchronize(device: str) -> None:
    """Wait for the device's queued work (a CUDA step returns before its kernels have run)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def stream_bandwidth(numel: int, repeats: int = 5, device: str = "cpu") -> float:
    """In-place streaming bandwidth in bytes/s: median time of ``a += b`` over fp32 buffers (12 bytes/element)."""
    a, b = torch.ones(numel, device=device), torch.ones(numel, device=device)
    a.add_(b)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a.add_(b)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 12 * numel / statistics.median(times)


def step_bytes_per_param(param_bytes: int, state_per_param: float) -> float:
    """Bytes one step must move per parameter: parameter read and written, gradient read, state read and written."""
    return 3 * param_bytes + 2 * state_per_param


def _compile_seconds() -> float:
    return sum(entry["compile_seconds"] for entry in compile_stats().values())


def measure(algorithm: Algorithm, total: int, count: int, dtype: torch.dtype, *, rounds: int, steps: int,
            bandwidth: float, shapes: list[tuple[int, ...]] | None = None, device: str = "cpu"
            ) -> list[dict[str, Any]]:
    """Interleaved timing of every implementation of ``algorithm`` on shared parameters; one row per implementation.

    ``bandwidth`` (bytes/s) gives each row's ``bandwidth_fraction``; :func:`run` recomputes it at the end
    with the peak bandwidth of the whole run (:func:`add_bandwidth_fractions`).
    """
    params = make_params(total, count, dtype, shapes=shapes, device=device)
    grads = [p.grad for p in params]

    def restore_grads() -> None:  # some peers (heavyball) clear or reuse ``.grad`` after their step
        for param, grad in zip(params, grads):
            param.grad = grad

    numel = sum(p.numel() for p in params)
    rows: dict[str, dict[str, Any]] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for impl in algorithm.impls:
        row: dict[str, Any] = {"algorithm": algorithm.name, "impl": impl.label, "source": impl.source,
                               "params": numel, "tensors": count, "dtype": str(dtype).replace("torch.", "")}
        rows[impl.label] = row
        try:
            optimizer = impl.build(params)
            before = _compile_seconds()
            _synchronize(device)
            start = time.perf_counter()
            optimizer.step()  # warm-up: lazy state, compilation
            _synchronize(device)
            row["first_step_s"] = time.perf_counter() - start
            row["compile_s"] = _compile_seconds() - before if impl.source == "optimlab" else None
            if impl.compiles and row["compile_s"] is None:
                row["compile_s"] = row["first_step_s"]
            restore_grads()
            optimizer.step()
            restore_grads()
            optimizers[impl.label] = optimizer
        except Exception as error:  # a peer or path that cannot run this configuration is reported, not fatal
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    times: dict[str, list[float]] = {label: [] for label in optimizers}
    per_round: dict[str, list[float]] = {label: [] for label in optimizers}
    labels = list(optimizers)
    load_before = os.getloadavg()[0]
    for round_index in range(rounds):
        shift = round_index % max(len(labels), 1)
        for label in labels[shift:] + labels[:shift]:
            for _ in range(steps):
                _synchronize(device)
                start = time.perf_counter()
                optimizers[label].step()
                _synchronize(device)
                times[label].append(time.perf_counter() - start)
                restore_grads()
            per_round[label].append(1e3 * statistics.mean(times[label][-steps:]))
    load_after = os.getloadavg()[0]
    for label, optimizer in optimizers.items():
        seconds = statistics.median(times[label])
        state_per_param = state_bytes_per_param(optimizer)
        moved = step_bytes_per_param(params[0].element_size(), state_per_param)
        rows[label].update({
            "ms_per_step": 1e3 * seconds,
            "round_ms": per_round[label],
            "load": [load_before, load_after],
            "gparams_per_s": numel / seconds / 1e9,
            "state_bytes_per_param": state_per_param,
            "bytes_per_param_moved": moved,
        })
    add_bandwidth_fractions(list(rows.values()), bandwidth)
    del optimizers, params
    gc.collect()
    return list(rows.values())


def add_bandwidth_fractions(rows: list[dict[str, Any]], bandwidth: float) -> None:
    """Set ``bandwidth_fraction`` = bytes a step must move / step time / ``bandwidth`` on each timed row."""
    for row in rows:
        if "ms_per_step" in row:
            row["bandwidth_fraction"] = row["bytes_per_param_moved"] * row["params"] / (row["ms_per_step"] / 1e3) / bandwidth


def machine_description(device: str = "cpu") -> dict[str, Any]:
    """CPU model, core count, memory, torch version and threads (and the GPU when one is used)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    machine = {"cpu": model, "cores": os.cpu_count(), "memory_gib": memory_gib, "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "python": platform.python_version(), "platform": platform.platform()}
    if torch.device(device).type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        machine.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                       cuda=torch.version.cuda, driver=_nvidia_driver())
    return machine


def _nvidia_driver() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it (None where it cannot be asked)."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


GPU_ALGORITHMS = ("adamw", "adam", "sgd-momentum", "lion", "lamb", "adamw-bf16-state", "adamw-int8-state")


def default_plan(quick: bool, device: str = "cpu") -> list[tuple[str, str, torch.dtype, list[str] | None]]:
    """(size, algorithm, dtype, implementation labels or None for all) in the order they are run. On a GPU: the
    issue-18 table, GPT-2 small for the main algorithms and 1.3B parameters for AdamW."""
    if torch.device(device).type == "cuda":
        return [("gpt2-small", name, torch.float32, None) for name in GPU_ALGORITHMS] + [("1.3B", "adamw", torch.float32, None)]
    if quick:
        return [(size, name, torch.float32, None) for size in QUICK_SIZES for name in ("adamw", "lion")]
    table = algorithms()
    every = list(table)
    core = ["adamw", "adam", "sgd-momentum", "adamw-bf16-state", "adamw-int8-state"]
    small = [name for name, algorithm in table.items() if algorithm.elementwise and "state" not in name]
    plan: list[tuple[str, str, torch.dtype, list[str] | None]] = []
    plan += [("1M", name, torch.float32, None) for name in every]
    plan += [("20M", name, torch.float32, None) for name in every]
    plan += [("20M", name, torch.bfloat16, None) for name in ("adamw", "sgd-momentum", "lion")]
    plan += [("10k-small", name, torch.float32, None) for name in small]
    plan += [("200M", name, torch.float32, ["optimlab flat", "optimlab fused", "optimlab foreach", "torch fused"])
             for name in core]
    # the issue's table: flat and default paths against torch's fused step and its CPU default (no foreach rows:
    # at 124M parameters they take seconds a step and are not in the table)
    plan += [("gpt2-small", name, torch.float32, ["optimlab flat", "optimlab fused", "optimlab default", "torch fused",
                                                  "torch for-loop"]) for name in ("adamw", "adam", "sgd-momentum")]
    return [entry for entry in plan if table[entry[1]].sizes is None or entry[0] in table[entry[1]].sizes]


def run(quick: bool = False, sizes: list[str] | None = None, names: list[str] | None = None,
        include_compiled: bool = True, rounds: int | None = None, quiet: bool = False, device: str = "cpu"
        ) -> dict[str, Any]:
    """Run the benchmark and return ``{"machine", "bandwidth_gbs", "rows", "config"}``.

    ``quick``: tiny sizes and two rounds (checks the bookkeeping, not the speed); ``sizes`` / ``names``
    filter the plan; ``include_compiled=False`` leaves out implementations that compile.
    """
    table = algorithms(include_compiled)
    all_sizes = {**SIZES, **QUICK_SIZES}
    plan = [entry for entry in default_plan(quick, device)
            if (sizes is None or entry[0] in sizes) and (names is None or entry[1] in names)]
    rounds = rounds or (2 if quick else 5)
    stream_numel = 1 << (18 if quick else 26)
    bandwidth = stream_bandwidth(stream_numel, device=device)
    rows: list[dict[str, Any]] = []
    with progress("step throughput", total=len(plan), quiet=quiet, unit="configs") as bar:
        for size, name, dtype, labels in plan:
            algorithm = table[name]
            impls = [i for i in algorithm.impls if (labels is None or i.label in labels)
                     and (i.sizes is None or size in i.sizes)]
            algorithm = Algorithm(algorithm.name, impls, algorithm.elementwise, algorithm.target, algorithm.sizes)
            total, count = all_sizes[size]
            bandwidth = max(bandwidth, stream_bandwidth(stream_numel, repeats=3, device=device))  # the peak: load only lowers it
            slow = total >= 150_000_000 or count >= 1_000  # 200M parameters, or 10,000 tensors: fewer samples
            shapes = SHAPES[size]() if size in SHAPES else None
            for row in measure(algorithm, total, count, dtype, rounds=min(rounds, 3) if slow else rounds,
                               steps=1 if slow else 2, bandwidth=bandwidth, shapes=shapes, device=device):
                row["size"] = size
                rows.append(row)
            bar.advance(1, last=f"{size}/{name}")
    add_bandwidth_fractions(rows, bandwidth)
    measured = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for row in rows:
        row["measured"] = measured
    return {"machine": machine_description(device), "bandwidth_gbs": bandwidth / 1e9, "rows": rows, "measured": measured,
            "config": {"quick": quick, "rounds": rounds, "stream_mb": 4 * stream_numel / 2**20, "elementwise": {n: a.elementwise for n, a in table.items()},
                       "targets": {n: a.target for n, a in table.items()}}}


def merge(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``current`` with the rows of ``previous`` whose configuration (size, algorithm, dtype) it did not measure,
    in ``previous``'s order (a configuration new in ``current`` goes last); each row keeps the date it was measured."""
    def config(row: dict[str, Any]) -> tuple[str, str, str]:
        return row["size"], row["algorithm"], row["dtype"]

    fresh: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in current["rows"]:
        fresh.setdefault(config(row), []).append(row)
    rows: list[dict[str, Any]] = []
    for row in previous["rows"]:
        key = config(row)
        if key in fresh:
            rows += fresh.pop(key)
        elif not any(config(r) == key for r in current["rows"]):
            rows.append(dict(row, measured=row.get("measured") or previous.get("measured") or "an earlier run"))
    rows += [row for group in fresh.values() for row in group]
    return dict(current, rows=rows, config=dict(current["config"], targets={
        **previous["config"].get("targets", {}), **current["config"]["targets"]}))


def _best(rows: list[dict[str, Any]], predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    candidates = [r for r in rows if predicate(r) and "ms_per_step" in r]
    return min(candidates, key=lambda r: r["ms_per_step"]) if candidates else None


def paired_ratio(theirs: dict[str, Any], ours: dict[str, Any]) -> tuple[float, float | None, float | None]:
    """``theirs`` time over ``ours`` as ``(ratio, lowest, highest)``: with per-round times from the same interleaved
    run (``round_ms``), the median of the rounds' ratios and their range (each round times both side by side,
    so a load change between rounds cancels out); otherwise the ratio of the medians and no range."""
    mine, other = ours.get("round_ms"), theirs.get("round_ms")
    if mine and other and len(mine) == len(other):
        ratios = [a / b for a, b in zip(other, mine)]
        return statistics.median(ratios), min(ratios), max(ratios)
    return theirs["ms_per_step"] / ours["ms_per_step"], None, None


def _ratio_cell(ratio: float | None, low: float | None = None, high: float | None = None, required: float | None = None,
                suffix: str = "") -> str:
    """``1.04x (0.97-1.12) yes``: the ratio, its range over the rounds when known, and the verdict when required."""
    if ratio is None:
        return "–"
    text = f"{ratio:.2f}{suffix}" + ("" if low is None else f" ({low:.2f}-{high:.2f})")
    return text if required is None else text + (" yes" if ratio >= required else " **no**")


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the performance issue as ``{"target", "size", "ratio", "required", "met", "detail"}``."""
    rows = results["rows"]
    targets = results["config"]["targets"]
    elementwise = results["config"]["elementwise"]
    verdicts: list[dict[str, Any]] = []
    configs = sorted({(r["size"], r["algorithm"], r["dtype"]) for r in rows})
    for size, name, dtype in configs:
        here = [r for r in rows if (r["size"], r["algorithm"], r["dtype"]) == (size, name, dtype)]
        ours = _best(here, lambda r: r["source"] == "optimlab")
        if ours is None:
            errors = [r["error"] for r in here if r["source"] == "optimlab" and "error" in r]
            if errors:
                verdicts.append({"target": targets.get(name, "3x"), "algorithm": name, "size": size, "dtype": dtype,
                                 "ours": "not available", "theirs": errors[0][:60], "ratio": None,
                                 "required": None, "met": False})
            continue
        kind = targets.get(name, "3x")
        if size in SMALL_TENSOR_SIZES:
            theirs = _best(here, lambda r: r["impl"] in ("torch fused", "torch foreach"))
            required, label = 1.0, "10k small tensors: >= torch fused/foreach"
        elif kind == "torch-fused":
            theirs = _best(here, lambda r: r["impl"] == "torch fused")
            required, label = 1.0, ">= 1.0x torch fused"
        elif kind.startswith("lowp-"):
            # torch's fused fp32 AdamW timed in the same interleaved run (paired by round), else the fp32 AdamW row
            fp32 = [r for r in rows if r["size"] == size and r["algorithm"] == "adamw" and r["dtype"] == dtype]
            theirs = _best(here, lambda r: r["impl"] == "torch fused") or _best(fp32, lambda r: r["impl"] == "torch fused")
            required, label = float(kind.split("-")[1]), f">= {kind.split('-')[1]}x torch fused fp32 AdamW"
        else:
            theirs = _best(here, lambda r: r["source"] != "optimlab")
            required, label = 3.0, ">= 3x best torch/peer"
        if theirs is None:
            continue
        ratio, low, high = paired_ratio(theirs, ours)
        verdict = {"target": label, "algorithm": name, "size": size, "dtype": dtype, "ours": ours["impl"],
                   "theirs": theirs["impl"], "ratio": ratio, "range": [low, high], "required": required,
                   "met": ratio >= required}
        if kind == "3x" and elementwise.get(name, True) and size not in SMALL_TENSOR_SIZES:
            verdict["bandwidth_fraction"] = ours["bandwidth_fraction"]
            verdict["met"] = verdict["met"] and ours["bandwidth_fraction"] >= 0.8
        verdicts.append(verdict)
        default = _best(here, lambda r: r["impl"] == "optimlab default")
        torch_default = _best(here, lambda r: r["impl"] == TORCH_CPU_DEFAULT)
        if default is not None and torch_default is not None:
            ratio, low, high = paired_ratio(torch_default, default)
            verdicts.append({"target": "default: >= torch's default (CPU: for-loop)", "algorithm": name, "size": size,
                             "dtype": dtype, "ours": default["impl"], "theirs": torch_default["impl"],
                             "ratio": ratio, "range": [low, high], "required": 1.0, "met": ratio >= 1.0})
    return verdicts


TORCH_CPU_DEFAULT = "torch for-loop"
"""torch.optim's path with no foreach/fused argument on CPU (foreach kernels are its default on CUDA only)."""

ISSUE_COLUMNS = (("AdamW flat", "adamw", "optimlab flat", "torch fused", 1.0),
                 ("Adam flat", "adam", "optimlab flat", "torch fused", 1.0),
                 ("SGD-momentum flat", "sgd-momentum", "optimlab flat", "torch fused", 1.0),
                 ("AdamW default vs torch fused", "adamw", "optimlab default", "torch fused", None),
                 ("AdamW default vs torch's default", "adamw", "optimlab default", TORCH_CPU_DEFAULT, 1.0),
                 ("Adam default vs torch's default", "adam", "optimlab default", TORCH_CPU_DEFAULT, 1.0),
                 ("SGD-momentum default vs torch's default", "sgd-momentum", "optimlab default", TORCH_CPU_DEFAULT, 1.0))
"""The issue's table: (column, algorithm, optimlab path, torch path it is divided into, ratio required or None)."""


def issue_table(results: dict[str, Any]) -> list[str]:
    """The performance issue's table: torch's step time over optimlab's (flat mode against torch's fused step, the
    default path against torch's fused step and against torch's default), per shape set, each cell the median of
    the rounds' paired ratios with their range and the verdict; empty when no row of it was measured."""
    rows = results["rows"]

    def row(size: str, algorithm: str, impl: str) -> dict[str, Any] | None:
        return _best(rows, lambda r: (r["size"], r["algorithm"], r["impl"], r["dtype"]) == (size, algorithm, impl,
                                                                                            "float32"))

    lines, loads = [], []
    for size in ("gpt2-small", "20M", "200M", "10k-small"):
        cells = []
        for _, algorithm, impl, against, required in ISSUE_COLUMNS:
            ours, theirs = row(size, algorithm, impl), row(size, algorithm, against)
            cells.append(None if ours is None or theirs is None else (*paired_ratio(theirs, ours), required))
            loads += [value for r in (ours, theirs) if r is not None for value in r.get("load", [])]
        if all(cell is None for cell in cells):
            continue
        total, count = SIZES[size]
        lines.append(f"| {size} ({count} tensors, {total / 1e6:.0f}M params) | "
                     + " | ".join("–" if cell is None else _ratio_cell(*cell) for cell in cells) + " |")
    if not lines:
        return []
    header = ["#### The issue's table (torch ms / optimlab ms: median of the rounds' paired ratios, their range, and "
              "the verdict where a target applies: >= 1.0)", "",
              "| shapes | " + " | ".join(column for column, *_ in ISSUE_COLUMNS) + " |",
              "|---|" + "---:|" * len(ISSUE_COLUMNS)]
    footer = [f"Load average (1 min, `os.getloadavg`) before/after these configurations: {min(loads):.1f}-"
              f"{max(loads):.1f} on {os.cpu_count()} cores." if loads else "", ""]
    return header + lines + [""] + footer


def _fmt(value: Any, digits: str = ".3g") -> str:
    if value is None:
        return "–"
    return format(value, digits) if isinstance(value, float) else str(value)


def to_markdown(results: dict[str, Any]) -> str:
    """Markdown: machine, bandwidth, one table per (size, dtype), then the targets with their verdicts."""
    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, torch {machine['torch']} "
        f"({machine['torch_threads']} threads, {machine['cpu_capability']}), Python {machine['python']}.",
        f"Streaming bandwidth (in-place `a += b` over two {results['config'].get('stream_mb', 256):.0f} MB buffers, "
        f"the best of the measurements taken before each configuration of this run): "
        f"**{results['bandwidth_gbs']:.1f} GB/s**.",
        "",
    ]
    lines += issue_table(results)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results["rows"]:
        groups.setdefault((row["size"], row["dtype"]), []).append(row)
    for (size, dtype), rows in groups.items():
        dates = sorted({row.get("measured") or "an earlier run" for row in rows})
        loads = [value for row in rows for value in row.get("load", [])]
        load = f"; load average {min(loads):.1f}-{max(loads):.1f}" if loads else ""
        lines += [f"#### {size} parameters ({rows[0]['tensors']} tensors), {dtype} (measured: {', '.join(dates)}{load})",
                  "",
                  "| algorithm | implementation | G params/s | ms/step | fraction of bandwidth | state B/param "
                  "| compile s |", "|---|---|---:|---:|---:|---:|---:|"]
        for row in rows:
            if "error" in row:
                lines.append(f"| {row['algorithm']} | {row['impl']} | – | – | – | – | {row['error']} |")
                continue
            lines.append(f"| {row['algorithm']} | {row['impl']} | {row['gparams_per_s']:.3f} | "
                         f"{row['ms_per_step']:.2f} | {row['bandwidth_fraction']:.0%} | "
                         f"{row['state_bytes_per_param']:.2f} | {_fmt(row.get('compile_s'), '.1f')} |")
        lines.append("")
    verdicts = evaluate_targets(results)
    if verdicts:
        lines += ["#### Targets", "", "| algorithm | size | dtype | target | ours | against | ratio | bandwidth | met |",
                  "|---|---|---|---|---|---|---:|---:|---|"]
        for v in verdicts:
            lines.append(f"| {v['algorithm']} | {v['size']} | {v['dtype']} | {v['target']} | {v['ours']} | "
                         f"{v['theirs']} | {_ratio_cell(v['ratio'], *v.get('range', [None, None]), suffix='x')} | "
                         f"{_fmt(v.get('bandwidth_fraction'), '.0%')} | "
                         f"{'yes' if v['met'] else '**no**'} |")
        lines.append("")
    return "\n".join(lines)


def write(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``step_throughput.json`` and ``step_throughput.md`` into ``out`` (atomically); return both paths."""
    return write_json_and_markdown(out, "step_throughput", results, to_markdown(results))


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out DIR`` (default docs), ``--quick``, ``--sizes``, ``--algorithms``, ``--rounds``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=None, help="comma-separated subset of " + ",".join(SIZES))
    parser.add_argument("--algorithms", default=None, help="comma-separated subset of " + ",".join(algorithms()))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the GPU plan: GPT-2 small and 1.3B)")
    args = parser.parse_args(argv)
    results = run(args.quick, sizes=args.sizes.split(",") if args.sizes else None,
                  names=args.algorithms.split(",") if args.algorithms else None, rounds=args.rounds,
                  device=args.device)
    for path in write(results, args.out):
        print(path)
    print(to_markdown(results))


if __name__ == "__main__":
    main()
