"""Matrix rows for the modern optimizers (Lion, LAMB, LARS, Adafactor, Schedule-Free AdamW).

Joined into ``ALL_CASES`` by ``cases.py``, so every generic property test applies to them. Only Lion
has a reference here that takes the same keyword arguments and runs on every test problem
(``lion_pytorch``); the others are checked against their references in ``test_modern_parity.py``
(torch's Adafactor rejects the complex parameters of the matrix problems). Muon takes only 2-D
matrices and MuonWithAdamW splits each param group in two (Muon part, AdamW part), which the
matrix's assumptions (group 0 holds the problem's parameters in order, every group shows the
default ``lr``) do not fit; ``test_modern_muon.py`` checks the same properties for them.
"""

from __future__ import annotations

from lion_pytorch import Lion as LionPytorch

from optimlab.optim import LAMB, LARS, Adafactor, Lion, ScheduleFreeAdamW

from .cases import Case

MODERN_CASES: list[Case] = [
    Case("lion-default", Lion, {"lr": 1e-3}, LionPytorch),
    Case("lion-betas-wd", Lion, {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1}, LionPytorch),
    Case("lion-maximize", Lion, {"lr": 1e-3, "maximize": True}),
    Case("lion-bf16-state", Lion, {"lr": 1e-3, "weight_decay": 0.1, "state_dtype": "bfloat16"}),
    Case("lion-int8-state", Lion, {"lr": 1e-3, "betas": (0.8, 0.9), "state_dtype": "int8"}),
    Case("lamb-default", LAMB, {"lr": 0.01}),
    Case("lamb-wd-max-trust", LAMB, {"lr": 0.01, "weight_decay": 0.1, "max_trust_ratio": 2.0}),
    Case("lamb-no-bias-correction-maximize", LAMB, {"lr": 0.01, "bias_correction": False, "maximize": True}),
    Case("lars-default", LARS, {"lr": 0.5, "trust_coefficient": 0.02}),
    Case("lars-wd-adapt-all", LARS, {"lr": 0.5, "trust_coefficient": 0.02, "weight_decay": 0.01,
                                     "exclude_bias_and_norm": False}),
    Case("lars-maximize", LARS, {"lr": 0.2, "momentum": 0.5, "trust_coefficient": 0.05, "maximize": True}),
    Case("adafactor-default", Adafactor, {"lr": 0.05}),
    Case("adafactor-momentum-wd", Adafactor, {"lr": 0.05, "beta1": 0.9, "weight_decay": 0.1, "d": 1.5}),
    Case("adafactor-absolute-step-maximize", Adafactor, {"lr": 0.01, "relative_step": False,
                                                         "scale_parameter": False, "maximize": True}),
    Case("schedulefreeadamw-default", ScheduleFreeAdamW, {"lr": 0.01}),
    Case("schedulefreeadamw-warmup-wd", ScheduleFreeAdamW, {"lr": 0.01, "warmup_steps": 5, "weight_decay": 0.1,
                                                            "r": 0.5}),
    Case("schedulefreeadamw-maximize", ScheduleFreeAdamW, {"lr": 0.01, "betas": (0.8, 0.99), "maximize": True}),
]
