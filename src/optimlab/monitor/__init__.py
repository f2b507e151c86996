"""Optimizer-state monitoring: :class:`OptimizerMonitor` and its sinks (memory, CSV, JSON lines, TensorBoard).

::

    from optimlab.monitor import CSVSink, MemorySink, OptimizerMonitor

    monitor = OptimizerMonitor(optimizer, every=10, sinks=[MemorySink(), CSVSink("run/monitor.csv")])
    ...  # train as usual: the monitor records through the optimizer's step hooks
    print(monitor.summary())  # {"step": 100.0, "grad_norm/group0": ..., "eff_lr_mean/group0": ..., ...}
    monitor.remove()
"""

from optimlab.monitor.monitor import OptimizerMonitor
from optimlab.monitor.sinks import CSVSink, JSONLSink, MemorySink, Sink, TensorBoardSink

__all__ = ["CSVSink", "JSONLSink", "MemorySink", "OptimizerMonitor", "Sink", "TensorBoardSink"]
