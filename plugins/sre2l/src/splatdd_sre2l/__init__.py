"""splatdd's SRe2L plugin (Yin, Xing & Shen, NeurIPS 2023): squeeze, recover, relabel.

* squeeze: ``splatdd teacher`` (:mod:`splatdd_sre2l.teacher`) trains a BatchNorm teacher;
* recover: the algorithm ``sre2l`` (:class:`splatdd_sre2l.algorithm.SRe2L`) optimises any
  parameterization's decoded images against the teacher's BN statistics;
* relabel: the evaluation protocol ``soft-label`` (:class:`splatdd_sre2l.soft_label.SoftLabelProtocol`)
  trains students on per-crop teacher soft labels. Its accuracies are not comparable with
  hard-label ones.

Example::

    splatdd teacher --dataset fashion_mnist --epochs 10 --out teachers/fmnist
    splatdd distill --algo sre2l --algo-opt teacher=teachers/fmnist --param pixel --ipc 1 --out runs/x
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
