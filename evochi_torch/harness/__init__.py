"""The training harness: run directories, metrics, loggers, progress, resume.

* :mod:`~evochi_torch.harness.trainer`: `Trainer`, `RunConfig`, `train`;
* :mod:`~evochi_torch.harness.rundir`: `RunDir`, and the rule that no run replaces another;
* :mod:`~evochi_torch.harness.loggers`: CSV, TensorBoard, Weights & Biases;
* :mod:`~evochi_torch.harness.progress`: progress lines and the learning curve.
"""

from .loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger, make_loggers, read_metrics
from .progress import plot_curve, progress_line
from .rundir import RunDir, RunDirExistsError, new_run_dir
from .trainer import (
    METRICS_FIELDS,
    TIMING_FIELDS,
    RunConfig,
    RunResult,
    Trainer,
    attach_state,
    load_state,
    offline_worker,
    train,
)

__all__ = [
    "METRICS_FIELDS",
    "TIMING_FIELDS",
    "CSVLogger",
    "Logger",
    "RunConfig",
    "RunDir",
    "RunDirExistsError",
    "RunResult",
    "TensorBoardLogger",
    "Trainer",
    "WandbLogger",
    "attach_state",
    "load_state",
    "make_loggers",
    "new_run_dir",
    "offline_worker",
    "plot_curve",
    "progress_line",
    "read_metrics",
    "train",
]
