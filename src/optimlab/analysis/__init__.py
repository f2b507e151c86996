"""Analysis tools: the LR range test, loss-landscape slices, the Hessian spectrum and sharpness tracking.

A loss function here is ``loss_fn(model, batch) -> scalar tensor``; :func:`supervised_loss` makes one from a
criterion for ``(inputs, targets)`` batches.
"""

from optimlab.analysis._params import supervised_loss
from optimlab.analysis.hessian import (
    CurvatureReport,
    HessianOperator,
    analyze_curvature,
    hutchinson_trace,
    lanczos_eigenvalues,
    plot_spectrum,
    spectral_density,
    stability_bound,
)
from optimlab.analysis.landscape import (
    interpolate,
    perturbation_probe,
    plot_contour,
    plot_slice_1d,
    plot_surface,
    random_direction,
    slice_1d,
    slice_2d,
)
from optimlab.analysis.lr_find import LRFindResult, lr_find, plot_lr_find
from optimlab.analysis.sharpness import SharpnessTrace, plot_sharpness, track_sharpness

__all__ = [
    "CurvatureReport",
    "HessianOperator",
    "LRFindResult",
    "SharpnessTrace",
    "analyze_curvature",
    "hutchinson_trace",
    "interpolate",
    "lanczos_eigenvalues",
    "lr_find",
    "perturbation_probe",
    "plot_contour",
    "plot_lr_find",
    "plot_sharpness",
    "plot_slice_1d",
    "plot_spectrum",
    "plot_surface",
    "random_direction",
    "slice_1d",
    "slice_2d",
    "spectral_density",
    "stability_bound",
    "supervised_loss",
    "track_sharpness",
]
