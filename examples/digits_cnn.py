"""A task file for `optimlab bench`: a small convolutional net on scikit-learn's bundled digits (1x8x8).

Which optimizer, learning rate, schedule and clipping suit this model? One command answers it:

    optimlab bench --task examples/digits_cnn.py:TASK --optimizers adamw,lion,sgd-momentum --trials 8 --seeds 3
    optimlab report latest -o report/
    optimlab recommend --task examples/digits_cnn.py:TASK

or, from Python:

    from optimlab.bench import compare
    result = compare("examples/digits_cnn.py:TASK", optimizers=["adamw", "lion"], trials=8, seeds=3)
    print(result.verdicts["digits-cnn"])
    result.report("report/")

Everything below is ordinary PyTorch: a model factory, a loss, a DataLoader and an evaluation.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optimlab.bench.tasks import make_task

# The data: 1797 grey 8x8 images, scaled to [0, 1]; a fixed 80/20 split (independent of the run's seed).
_digits = load_digits()
_images = torch.tensor(_digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
_labels = torch.tensor(_digits.target, dtype=torch.int64)
_order = torch.randperm(len(_labels), generator=torch.Generator().manual_seed(0))
_val, _train = _order[:360], _order[360:]
TRAIN = TensorDataset(_images[_train], _labels[_train])
VAL_X, VAL_Y = _images[_val], _labels[_val]


def model(seed: int) -> nn.Module:
    """Two 3x3 convolutions, a 2x2 max-pool and a linear classifier (optimlab seeds torch before calling)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def loss(net: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(net(images), labels)


def batches(seed: int) -> DataLoader:
    """Shuffled minibatches of 64, the order set by the run's seed."""
    return DataLoader(TRAIN, batch_size=64, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def evaluate(net: nn.Module) -> dict:
    device = next(net.parameters()).device
    logits = net(VAL_X.to(device))
    labels = VAL_Y.to(device)
    return {"val_accuracy": (logits.argmax(1) == labels).float().mean().item(),
            "val_loss": F.cross_entropy(logits, labels).item()}


TASK = make_task(
    "digits-cnn",
    model=model, loss=loss, batches=batches, evaluate=evaluate,
    metric="val_accuracy", mode="max", target=0.97, steps=300, eval_every=25,
    description="2-conv CNN on sklearn digits (1x8x8), batch 64",
)
