"""The seed's demonstrations, one module each, each a thin composition of library calls.

* :mod:`optimlab.demos.functions`: SGD variants on Rosenbrock; SGD, momentum, Adam, AdamW on a 10-D
  nonconvex sum (``optimlab demo functions``).
* :mod:`optimlab.demos.clipping`: gradient clipping on an exploding RNN (``optimlab demo clipping``).
"""
