"""The path ``foreach=None`` takes per device (optimlab.optim._base.default_foreach), that the optimizers follow it,
and the per-tensor path's slices of large tensors (loop_pieces), which must not change a result."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

import optimlab.optim._base as base_module
import optimlab.optim.adam as adam_module
import optimlab.optim as optim
from optimlab.optim import Adam
from optimlab.optim._base import FOREACH_CPU_MAX_MEAN_NUMEL, default_foreach, loop_pieces


def _fake(device: str, numel: int) -> SimpleNamespace:
    # the rule reads only the device type and the size
    return SimpleNamespace(device=torch.device(device), numel=lambda: numel)


def test_rule_per_device() -> None:
    big, small = FOREACH_CPU_MAX_MEAN_NUMEL + 1, FOREACH_CPU_MAX_MEAN_NUMEL
    assert default_foreach([torch.zeros(big), torch.zeros(big)]) is False  # CPU, large tensors: the loop
    assert default_foreach([torch.zeros(small), torch.zeros(small)]) is True  # CPU, small tensors: foreach
    assert default_foreach([torch.zeros(2 * small - 10), torch.zeros(10)]) is True  # the mean decides
    assert default_foreach([_fake("cuda", big), _fake("cuda", 3)]) is True  # CUDA: foreach whatever the sizes
    assert default_foreach([_fake("cuda", big), torch.zeros(big)]) is False  # CUDA and CPU: the CPU rule
    assert default_foreach([torch.zeros(3, device="meta")]) is False  # no foreach kernels: the loop
    assert default_foreach([]) is False


@pytest.mark.parametrize("numel,expected", [(FOREACH_CPU_MAX_MEAN_NUMEL * 2, "loop"), (64, "foreach")])
def test_adam_takes_the_chosen_path(monkeypatch: pytest.MonkeyPatch, numel: int, expected: str) -> None:
    taken: list[str] = []
    for name, label in (("_adam_single_tensor", "loop"), ("_adam_multi_tensor", "foreach")):
        real = getattr(adam_module, name)
        monkeypatch.setattr(adam_module, name,
                            lambda *args, _real=real, _label=label, **kwargs: (taken.append(_label), _real(*args, **kwargs)))
    params = [torch.zeros(numel, requires_grad=True) for _ in range(3)]
    for p in params:
        p.grad = torch.ones(numel)
    Adam(params, lr=0.1).step()
    Adam(params, lr=0.1, foreach=True).step()
    Adam(params, lr=0.1, foreach=False).step()
    assert taken == [expected, "foreach", "loop"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_is_foreach() -> None:
    assert default_foreach([torch.zeros(FOREACH_CPU_MAX_MEAN_NUMEL * 4, device="cuda")]) is True


def test_loop_pieces_slices_large_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base_module, "LOOP_CHUNK_NUMEL", 1000)
    param, grad = torch.randn(7, 301), torch.randn(7, 301)  # 2107 values: slices of 1000, 1000, 107
    with torch.no_grad():
        pieces = loop_pieces(param, grad, None)
    assert [tuple(t.numel() for t in piece[:2]) for piece in pieces] == [(1000, 1000), (1000, 1000), (107, 107)]
    assert all(piece[2] is None for piece in pieces)
    flat = param.view(-1)
    assert [p.data_ptr() for p, *_ in pieces] == [flat[i].data_ptr() for i in (0, 1000, 2000)]  # views, in order
    with torch.no_grad():
        assert loop_pieces(torch.randn(1000), torch.randn(1000))[0][0].shape == (1000,)  # small: whole
        assert len(loop_pieces(param.t(), grad.t())) == 1  # not contiguous: whole
        assert len(loop_pieces(param, torch.randn(2107))) == 3  # same number of values, other shape: sliced
        assert len(loop_pieces(param, torch.randn(2108))) == 1  # sizes differ: whole
    assert len(loop_pieces(param, grad)) == 1  # autograd on (differentiable=True): whole
    with torch.no_grad():  # under torch.compile (the compiler fuses the rule): whole
        assert torch.compile(lambda: len(loop_pieces(param, grad)), backend="eager", fullgraph=True)() == 1


_SLICED_CASES = {
    "adamw": ("AdamW", {"lr": 0.01, "weight_decay": 0.1}),
    "adam-amsgrad-maximize": ("Adam", {"lr": 0.01, "amsgrad": True, "maximize": True, "weight_decay": 0.05}),
    "sgd-nesterov": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    "sgd-dampening": ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    "nadam-decoupled": ("NAdam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    "radam": ("RAdam", {"lr": 0.01, "weight_decay": 0.1}),  # not torch's bits even unsliced (see below)
    "adamax": ("Adamax", {"lr": 0.01, "weight_decay": 0.1}),
    "adagrad": ("Adagrad", {"lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.1}),
    "rmsprop-centered-momentum": ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.9, "weight_decay": 0.1}),
    "adadelta": ("Adadelta", {"lr": 1.0, "weight_decay": 0.1, "maximize": True}),
}
_NOT_TORCH_BITS = {"radam"}  # optimlab's RAdam differs from torch's loop by an ulp before any slicing (1.5e-8 here)


@pytest.mark.parametrize("chunk", [None, 999])
@pytest.mark.parametrize("case", list(_SLICED_CASES))
def test_sliced_loop_equals_torch_loop(monkeypatch: pytest.MonkeyPatch, case: str, chunk: int | None) -> None:
    """The per-tensor path updates large tensors slice by slice: bit for bit the same loop on whole tensors and
    torch.optim's for-loop, at the real slice size (a tensor of two slices and a remainder) and at an odd one
    (999: slice edges inside the vector loops' blocks)."""
    name, options = _SLICED_CASES[case]
    ours_cls, torch_cls = getattr(optim, name), getattr(torch.optim, name)
    if chunk is not None:
        monkeypatch.setattr(base_module, "LOOP_CHUNK_NUMEL", chunk)
    size = 2 * base_module.LOOP_CHUNK_NUMEL + 37
    generator = torch.Generator().manual_seed(0)
    shapes = [(size,), (3, 5)]  # one sliced tensor, one small one
    ours = [torch.randn(shape, generator=generator, requires_grad=True) for shape in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    whole = [p.detach().clone().requires_grad_() for p in ours]
    opt_ours, opt_theirs = ours_cls(ours, foreach=False, **options), torch_cls(theirs, foreach=False, **options)
    opt_whole = ours_cls(whole, foreach=False, **options)
    sliced: list[int] = []
    real = base_module.loop_pieces
    monkeypatch.setattr(sys.modules[ours_cls.__module__], "loop_pieces",
                        lambda *tensors: sliced.append(len(pieces := real(*tensors))) or pieces)
    for _ in range(3):
        for p, q, r in zip(ours, theirs, whole):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad, r.grad = p.grad.clone(), p.grad.clone()
        opt_ours.step()
        opt_theirs.step()
        chunk_numel = base_module.LOOP_CHUNK_NUMEL
        base_module.LOOP_CHUNK_NUMEL = size  # the reference: the same loop on whole tensors
        try:
            opt_whole.step()
        finally:
            base_module.LOOP_CHUNK_NUMEL = chunk_numel
    assert max(sliced) == -(-size // base_module.LOOP_CHUNK_NUMEL)  # the large tensor did go in slices
    references = [(whole, opt_whole)] + ([] if case in _NOT_TORCH_BITS else [(theirs, opt_theirs)])
    for params, optimizer in references:
        for p, q in zip(ours, params):
            assert torch.equal(p, q)
            for key, value in optimizer.state[q].items():
                assert torch.equal(opt_ours.state[p][key], value), key
