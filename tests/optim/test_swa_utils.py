"""optimlab.optim.swa_utils against torch.optim.swa_utils 2.13 (bit for bit) and against the formulas
(SWA = the mean of the snapshots, EMA = the recurrence); SWALR is a row of the schedule table
(tests/schedules/schedule_cases.py: parity, closed form, resume, step(epoch))."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.optim.swa_utils as torch_swa
from torch import nn

from optimlab.optim import swa_utils as ours

DEVICE = "cuda"  # of the gpu-marked test (its logic checked on the CPU by setting "cpu")


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, t: int) -> None:
    generator = torch.Generator().manual_seed(100 + t)
    inputs = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    optimizer.zero_grad()
    model(inputs).pow(2).mean().backward()
    optimizer.step()


CONFIGS = {
    "swa": lambda lib: {},
    "swa-buffers": lambda lib: {"use_buffers": True},
    "ema-multi": lambda lib: {"multi_avg_fn": lib.get_ema_multi_avg_fn(0.9)},
    "ema-multi-buffers": lambda lib: {"multi_avg_fn": lib.get_ema_multi_avg_fn(0.8), "use_buffers": True},
    "ema-per-tensor": lambda lib: {"avg_fn": lib.get_ema_avg_fn(0.95)},
    "swa-per-tensor-buffers": lambda lib: {"avg_fn": lib.get_swa_avg_fn(), "use_buffers": True},
}


@pytest.mark.parametrize("config", CONFIGS)
def test_averaged_model_equals_torch(config: str) -> None:
    """Same averaged parameters, buffers and n_averaged as torch's AveragedModel after every update."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    averaged = ours.AveragedModel(model, **CONFIGS[config](ours))
    reference = torch_swa.AveragedModel(model, **CONFIGS[config](torch_swa))
    for t in range(12):
        _train_step(model, optimizer, t)
        averaged.update_parameters(model)
        reference.update_parameters(model)
        for key, value in reference.state_dict().items():
            assert torch.equal(averaged.state_dict()[key], value), (t, key)
    assert int(averaged.n_averaged) == 12
    probe = torch.randn(5, 4, dtype=torch.float64)
    averaged.eval(), reference.eval()
    assert torch.equal(averaged(probe), reference(probe))


def _snapshots(updates: int) -> tuple[nn.Module, list[dict[str, torch.Tensor]], ours.AveragedModel, ours.AveragedModel]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    swa = ours.AveragedModel(model, use_buffers=True)
    ema = ours.AveragedModel(model, multi_avg_fn=ours.get_ema_multi_avg_fn(0.7))
    snapshots = []
    for t in range(updates):
        _train_step(model, optimizer, t)
        swa.update_parameters(model)
        ema.update_parameters(model)
        snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return model, snapshots, swa, ema


def test_swa_is_the_mean_and_ema_the_recurrence() -> None:
    """SWA after n updates = the mean of the n snapshots; EMA = w̄₁ = w₁, w̄ₜ = d·w̄ₜ₋₁ + (1 − d)·wₜ
    (float64, 1e-12 relative); without use_buffers the EMA copy's BatchNorm buffers equal the model's."""
    model, snapshots, swa, ema = _snapshots(9)
    for name, _ in model.named_parameters():
        mean = torch.stack([s[name] for s in snapshots]).mean(0)
        torch.testing.assert_close(swa.module.get_parameter(name), mean, rtol=1e-12, atol=1e-14)
        expected = snapshots[0][name]
        for snapshot in snapshots[1:]:
            expected = 0.7 * expected + 0.3 * snapshot[name]
        torch.testing.assert_close(ema.module.get_parameter(name), expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert not torch.equal(swa.module[1].running_mean, model[1].running_mean)


def test_averaged_model_resumes_from_state_dict() -> None:
    """n_averaged is a buffer: a reloaded copy continues exactly as the uninterrupted one."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averaged = ours.AveragedModel(model)
    for t in range(4):
        _train_step(model, optimizer, t)
        averaged.update_parameters(model)
    resumed = ours.AveragedModel(model)
    resumed.load_state_dict(copy.deepcopy(averaged.state_dict()))
    for t in range(4, 7):
        _train_step(model, optimizer, t)
        averaged.update_parameters(model)
        resumed.update_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(averaged.state_dict().values(), resumed.state_dict().values()))


def test_update_bn_equals_torch_and_restores_the_model() -> None:
    batches = [torch.randn(6, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(5)]
    results = []
    for lib in (ours, torch_swa):
        model = _model()
        model[1].momentum = 0.3
        model.eval()
        lib.update_bn([(b, torch.zeros(6)) for b in batches], model)
        assert not model.training and model[1].momentum == 0.3
        results.append((model[1].running_mean.clone(), model[1].running_var.clone(), model[1].num_batches_tracked))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    # equal-weight average over the batches of the per-batch statistics (momentum=None)
    hidden = [_model()[0](b) for b in batches]
    torch.testing.assert_close(results[0][0], torch.stack([h.mean(0) for h in hidden]).mean(0).detach())


def test_update_bn_without_batch_norm_reads_no_data() -> None:
    def loader():
        raise AssertionError("update_bn iterated the loader of a model without BatchNorm")
        yield  # pragma: no cover

    ours.update_bn(loader(), nn.Linear(2, 2))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Only one of avg_fn and multi_avg_fn"):
        ours.AveragedModel(nn.Linear(2, 2), avg_fn=ours.get_swa_avg_fn(), multi_avg_fn=ours.get_swa_multi_avg_fn())
    for factory in (ours.get_ema_avg_fn, ours.get_ema_multi_avg_fn):
        with pytest.raises(ValueError, match=r"Invalid decay value 1.5 provided. Please provide a value in \[0,1\]"):
            factory(1.5)
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="anneal_epochs must be equal or greater than 0"):
        ours.SWALR(optimizer, swa_lr=0.05, anneal_epochs=-1)
    with pytest.raises(ValueError, match="Unknown anneal_strategy: 'exp'"):
        ours.SWALR(optimizer, swa_lr=0.05, anneal_strategy="exp")


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS)
def test_averaged_model_equals_torch_on_cuda(config: str) -> None:
    """On CUDA torch's default SWA blends float weights with a multi-tensor lerp (on the CPU: per tensor)."""
    model = _model().to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    averaged = ours.AveragedModel(model, **CONFIGS[config](ours))
    reference = torch_swa.AveragedModel(model, **CONFIGS[config](torch_swa))
    for t in range(6):
        generator = torch.Generator().manual_seed(100 + t)
        optimizer.zero_grad()
        model(torch.randn(8, 4, generator=generator, dtype=torch.float64).to(DEVICE)).pow(2).mean().backward()
        optimizer.step()
        averaged.update_parameters(model)
        reference.update_parameters(model)
    for key, value in reference.state_dict().items():
        assert torch.equal(averaged.state_dict()[key], value), key

