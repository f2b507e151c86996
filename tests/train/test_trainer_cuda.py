"""The trainer on a GPU: bf16 and fp16 (GradScaler) autocast, ``--compile``, exact resume, DDP over NCCL.

Every test is marked ``gpu`` and skipped without CUDA (CI has none); ``benchmarks/gpu_check.sh`` runs them on a
lent GPU. ``OPTIMLAB_TEST_DEVICE=cpu`` runs the device-independent ones on the CPU instead (fp16 and NCCL need
CUDA and stay skipped), which is how they were checked before any GPU was available.

Exact resume on CUDA: the embedding's backward (``index_put_`` with accumulation) and attention's backward add
with atomics, in an order that may change from run to run. Under ``torch.use_deterministic_algorithms(True)``
(with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``) they take deterministic kernels, and a stopped-and-resumed run must
equal the uninterrupted one bit for bit; without it the two agree only to rounding, which the second test
bounds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, tiny_config

from optimlab.guard import NonFiniteGuard
from optimlab.train.trainer import Trainer

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("OPTIMLAB_TEST_DEVICE", "cuda")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(), reason="needs CUDA itself")

# Attention and the embedding backward take deterministic kernels only under this switch; cuBLAS needs the
# workspace setting before its first call (set here, at import, before any test touches the GPU).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _train(config, stop_at: int | None = None, resume: bool = False) -> tuple[Trainer, list[float]]:
    trainer = Trainer(config, resume=resume, quiet=True)
    try:
        return trainer, trainer.train(stop_at=stop_at).losses
    finally:
        trainer.close()


def _config(out: Path, text_file: Path, **overrides):
    settings = dict(device=DEVICE, n_embd=32, block_size=32, batch_size=8, steps=16, checkpoint_every=8)
    settings.update(overrides)
    return tiny_config(out, text_file, **settings)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_the_device_lowers_the_loss(tmp_path: Path, text_file: Path, precision: str) -> None:
    trainer, losses = _train(_config(tmp_path, text_file, precision=precision, steps=30, lr=1e-2))
    assert next(trainer.model.parameters()).device.type == DEVICE
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


@needs_cuda
def test_fp16_trains_with_the_grad_scaler(tmp_path: Path, text_file: Path) -> None:
    trainer, losses = _train(_config(tmp_path, text_file, precision="fp16", steps=30, lr=1e-2))
    assert trainer.scaler is not None and trainer.scaler.is_enabled()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


@needs_cuda
def test_fp16_overflow_skips_the_step_and_counts_it() -> None:
    """A GradScaler with a huge scale overflows the fp16 gradients: the guard skips the step (parameters and
    state unchanged, bit for bit), counts it, and the scaler backs off."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 60)
    guard = NonFiniteGuard(optimizer, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(torch.randn(32, 64, device="cuda") * 100).square().mean()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    guard.step()
    scaler.update()
    assert guard.last_step_skipped and guard.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() < 2.0 ** 60


def test_compiled_model_trains(tmp_path: Path, text_file: Path) -> None:
    trainer, losses = _train(_config(tmp_path, text_file, compile=True, steps=20, lr=1e-2))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bitwise_under_deterministic_algorithms(tmp_path: Path, text_file: Path, precision: str,
                                                          deterministic: None) -> None:
    full = _train(_config(tmp_path / "full", text_file, precision=precision, dropout=0.1))[1]
    first = _train(_config(tmp_path / "split", text_file, precision=precision, dropout=0.1), stop_at=8)[1]
    torch.manual_seed(123)  # the checkpoint must restore every generator, the device's included
    resumed = _train(_config(tmp_path / "split", text_file, precision=precision, dropout=0.1), resume=True)[1]
    assert first + resumed == full


def test_resume_without_deterministic_algorithms_agrees_to_rounding(tmp_path: Path, text_file: Path) -> None:
    full = _train(_config(tmp_path / "full", text_file))[1]
    first = _train(_config(tmp_path / "split", text_file), stop_at=8)[1]
    resumed = _train(_config(tmp_path / "split", text_file), resume=True)[1]
    torch.testing.assert_close(torch.tensor(first + resumed), torch.tensor(full), rtol=1e-4, atol=0)


_NCCL_WORKER = """
import sys
import torch.distributed as dist
import optimlab.train.distributed as distributed
from optimlab.cli.train import worker_main

original = distributed.init_distributed
def reporting(*args, **kwargs):
    context = original(*args, **kwargs)
    print("backend:", dist.get_backend(), "device:", context.device, flush=True)
    return context
distributed.init_distributed = reporting
import optimlab.cli.train as cli_train
cli_train.init_distributed = reporting
worker_main()
"""


@needs_cuda
def test_ddp_over_nccl_with_one_process(tmp_path: Path, text_file: Path) -> None:
    """torchrun with one process on the GPU: the trainer's process group is NCCL's and the run completes."""
    worker = tmp_path / "worker.py"
    worker.write_text(_NCCL_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(worker),
               "--out", str(tmp_path / "run"), "--data", str(text_file), "--device", "cuda", "--block-size", "32",
               "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "8", "--steps", "12",
               "--eval-every", "6", "--eval-batches", "2", "--checkpoint-every", "6", "--sample-chars", "0",
               "--no-tensorboard", "--quiet"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "backend: nccl device: cuda:0" in result.stdout, result.stdout[-2000:]
    assert '"world_size": 1' in (tmp_path / "run" / "summary.json").read_text()
