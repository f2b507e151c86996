"""Analysis tools: the LR range test, loss-landscape slices and the Hessian spectrum."""

from optimlab.analysis._params import supervised_loss
from optimlab.analysis.lr_find import LRFindResult, lr_find, plot_lr_find

__all__ = ["LRFindResult", "lr_find", "plot_lr_find", "supervised_loss"]
