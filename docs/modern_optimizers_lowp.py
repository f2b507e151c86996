"""Convergence of memory-light optimizer state: float32 vs bfloat16 vs int8 moments, same steps.

Trains the bench's digits MLP (``digits-mlp``: 64-128-10, batch 64, 300 steps, seeds 0-2) and a small
character-level GPT (2 layers, width 64, context 64, batch 16, on the standard-library corpus) with
Lion and AdamW, once per state storage, and reports the final losses relative to float32 state.
Writes ``docs/modern_optimizers_lowp.png`` (training-loss curves) and prints a markdown table.

    OMP_NUM_THREADS=1 python docs/modern_optimizers_lowp.py            # about 10 minutes on one core
    OMP_NUM_THREADS=1 python docs/modern_optimizers_lowp.py --gpt-steps 0   # digits only, under a minute
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from optimlab.bench.tasks import get_task  # noqa: E402
from optimlab.bench.tasks.digits import digits_data  # noqa: E402
from optimlab.io import atomic_savefig  # noqa: E402
from optimlab.optim import AdamW, Lion  # noqa: E402
from optimlab.progress import progress  # noqa: E402
from optimlab.train.data import build_corpus, sample_batch, stdlib_corpus  # noqa: E402
from optimlab.train.model import GPT, GPTConfig  # noqa: E402

STATE_DTYPES = (None, "bfloat16", "int8")
OPTIMIZERS: dict[str, Callable] = {
    "Lion (lr 3e-4)": lambda params, state_dtype: Lion(params, lr=3e-4, state_dtype=state_dtype),
    "AdamW (lr 1e-3)": lambda params, state_dtype: AdamW([{"params": params, "state_dtype": state_dtype}], lr=1e-3),
}


def digits_run(make: Callable, seed: int, steps: int) -> tuple[list[float], float, float]:
    """Minibatch losses, final full-training-set loss and validation loss of one digits-MLP run."""
    instance = get_task("digits-mlp").build(seed)
    optimizer = make(instance.model.parameters())
    curve = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = instance.loss(next(instance.batches))
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    x_train, y_train, _, _ = digits_data()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(instance.model(x_train), y_train))
    return curve, train_loss, instance.evaluate()["loss"]


def gpt_run(make: Callable, corpus, steps: int, seed: int = 0) -> tuple[list[float], float, float]:
    """Minibatch losses, mean loss of the last 50 steps and validation loss (8 fixed batches) of one GPT run."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=len(corpus.vocab.chars), block_size=64, n_layer=2, n_head=4, n_embd=64))
    optimizer = make(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(steps):
        _, loss = model(*sample_batch(corpus.train, 16, 64, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    val_generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        val = statistics.mean(model(*sample_batch(corpus.val, 32, 64, val_generator))[1].item() for _ in range(8))
    return curve, statistics.mean(curve[-50:]), val


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average of a loss curve (bias-corrected), for plotting."""
    smoothed, average = [], 0.0
    for step, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**step))
    return smoothed


def main() -> None:
    """Run the comparison, print the table, write the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits-steps", type=int, default=300)
    parser.add_argument("--gpt-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("modern_optimizers_lowp.png"))
    args = parser.parse_args()
    tasks = ["digits MLP"] + (["GPT"] if args.gpt_steps > 0 else [])
    corpus = build_corpus(stdlib_corpus(max_chars=400_000), block_size=64) if args.gpt_steps > 0 else None
    results: dict[tuple[str, str, str | None], tuple[list[float], float, float]] = {}
    with progress("state-dtype runs", total=len(tasks) * len(OPTIMIZERS) * len(STATE_DTYPES)) as bar:
        for task in tasks:
            for label, factory in OPTIMIZERS.items():
                for state_dtype in STATE_DTYPES:
                    def make(params, state_dtype=state_dtype, factory=factory):
                        return factory(params, state_dtype)
                    if task == "GPT":
                        results[task, label, state_dtype] = gpt_run(make, corpus, args.gpt_steps)
                    else:
                        runs = [digits_run(make, seed, args.digits_steps) for seed in (0, 1, 2)]
                        curve = [statistics.mean(values) for values in zip(*(run[0] for run in runs))]
                        results[task, label, state_dtype] = (curve, statistics.mean(r[1] for r in runs),
                                                             statistics.mean(r[2] for r in runs))
                    bar.advance(1)

    print("| task | optimizer | state | final train loss | vs float32 | val loss | vs float32 |")
    print("|---|---|---|---|---|---|---|")
    for (task, label, state_dtype), (_, train_loss, val_loss) in results.items():
        _, reference_train, reference_val = results[task, label, None]
        print(f"| {task} | {label} | {state_dtype or 'float32'} | {train_loss:.4f} | {train_loss / reference_train - 1:+.2%} "
              f"| {val_loss:.4f} | {val_loss / reference_val - 1:+.2%} |")

    figure, axes = plt.subplots(2 * len(tasks), len(OPTIMIZERS), figsize=(11, 3.4 * 2 * len(tasks)), squeeze=False,
                             layout="constrained")
    for row, task in enumerate(tasks):
        for column, label in enumerate(OPTIMIZERS):
            curve_axis, gap_axis = axes[2 * row][column], axes[2 * row + 1][column]
            reference = smooth(results[task, label, None][0])
            for state_dtype, style in zip(STATE_DTYPES, ("-", "--", ":")):
                curve = smooth(results[task, label, state_dtype][0])
                name = f"{state_dtype or 'float32'} state"
                curve_axis.plot(range(1, len(curve) + 1), curve, style, label=name)
                gap_axis.plot(range(1, len(curve) + 1), [100 * (a / b - 1) for a, b in zip(curve, reference)], style,
                              label=name)
            curve_axis.set_title(f"{task}: {label}")
            curve_axis.set_ylabel("training loss (EMA 0.9)")
            curve_axis.set_yscale("log")
            gap_axis.set_title(f"{task}: {label}, vs float32 state")
            gap_axis.set_ylabel("difference (%)")
            for axis in (curve_axis, gap_axis):
                axis.set_xlabel("step")
                axis.legend()
    figure.suptitle("Optimizer state in float32, bfloat16 and int8 (block-wise, stochastic rounding)")
    atomic_savefig(figure, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
