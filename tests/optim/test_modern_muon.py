"""Muon and MuonWithAdamW beyond parity: the generic optimizer properties (checkpoint round trip,
deepcopy, param groups, schedulers) and the AdamW routing recipe on the GPT model."""

from __future__ import annotations

import copy

import pytest
import torch

from optimlab.optim import Muon, MuonWithAdamW, muon_param_split
from optimlab.train.model import GPT, GPTConfig

from .harness import MLPProblem, max_deviation, save_and_load, train


def _muon_with_adamw(params) -> MuonWithAdamW:
    return MuonWithAdamW(params, lr=0.02, weight_decay=0.05, adamw_lr=0.01, adamw_weight_decay=0.1)


def test_state_dict_round_trip_resumes_bitwise() -> None:
    problem = MLPProblem()
    optimizer = _muon_with_adamw(problem.parameters())
    train(problem, optimizer, 10)
    resumed_problem = MLPProblem()
    resumed_problem.load_state_dict(problem.state_dict())
    resumed = _muon_with_adamw(resumed_problem.parameters())
    resumed.load_state_dict(save_and_load(optimizer.state_dict()))
    train(problem, optimizer, 10, start=10)
    train(resumed_problem, resumed, 10, start=10)
    assert max_deviation(resumed_problem.parameters(), resumed, problem.parameters(), optimizer) == 0.0
    assert {key for state in optimizer.state.values() for key in state} == {
        "momentum_buffer", "step", "exp_avg", "exp_avg_sq"}


def test_deepcopy_continues_identically() -> None:
    problem = MLPProblem()
    optimizer = _muon_with_adamw(problem.parameters())
    train(problem, optimizer, 5)
    problem_copy, optimizer_copy = copy.deepcopy((problem, optimizer))
    train(problem, optimizer, 5, start=5)
    train(problem_copy, optimizer_copy, 5, start=5)
    assert max_deviation(problem_copy.parameters(), optimizer_copy, problem.parameters(), optimizer) == 0.0


def test_groups_split_by_shape_and_scheduler_scales_both() -> None:
    problem = MLPProblem()
    optimizer = _muon_with_adamw(problem.parameters())
    kinds = [(group["use_muon"], [tuple(p.shape) for p in group["params"]]) for group in optimizer.param_groups]
    assert kinds == [(True, [(8, 6), (3, 8)]), (False, [(8,), (8,), (8,), (3,)])]
    assert [group["lr"] for group in optimizer.param_groups] == [0.02, 0.01]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.1]
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(problem, optimizer, 1)
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 0.005]


def test_muon_alone_matches_muon_part_of_the_router() -> None:
    """The Muon groups of MuonWithAdamW follow exactly the Muon optimizer."""
    problem, reference_problem = MLPProblem(), MLPProblem()
    router = _muon_with_adamw(problem.parameters())
    matrices = [p for p in reference_problem.parameters() if p.dim() == 2]
    others = [p for p in reference_problem.parameters() if p.dim() != 2]
    muon = Muon(matrices, lr=0.02, weight_decay=0.05)
    adamw = torch.optim.AdamW(others, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    train(problem, router, 10)
    train(reference_problem, [muon, adamw], 10)
    for ours, reference in zip(problem.parameters(), reference_problem.parameters()):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


def test_param_split_routes_gpt_embeddings_head_and_vectors_to_adamw() -> None:
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16))
    hidden, other = muon_param_split(model)
    names = {id(p): name for name, p in model.named_parameters()}
    hidden_names = sorted(names[id(p)] for p in hidden)
    assert hidden_names == sorted(
        f"blocks.{i}.{layer}.weight" for i in range(2) for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert all(p.dim() == 2 for p in hidden)
    assert {id(p) for p in hidden}.isdisjoint(id(p) for p in other)
    assert len(hidden) + len(other) == len(list(model.parameters()))
    embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(any(e is p for p in other) for e in embeddings)
    optimizer = MuonWithAdamW([{"params": hidden, "use_muon": True}, {"params": other, "use_muon": False}],
                              lr=0.02, adamw_lr=3e-3)
    tokens = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        _, loss = model(tokens, tokens)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": -1.0}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"ns_steps": 0}, "ns_steps"),
    ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
    ({"adjust_lr_fn": "rms"}, "adjust_lr_fn"),
    ({"ns_dtype": torch.int8}, "ns_dtype"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    for cls in (Muon, MuonWithAdamW):
        with pytest.raises(ValueError, match=match):
            cls([torch.zeros(3, 3, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match="adamw_beta1"):
        MuonWithAdamW([torch.zeros(3, 3, requires_grad=True)], adamw_betas=(1.0, 0.9))
