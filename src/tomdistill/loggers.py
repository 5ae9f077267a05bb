"""The CSV training log of a run that can be resumed (conf/logger/csv.yaml).

Lightning's CSV writer deletes an existing `metrics.csv` when it starts (lightning_fabric/loggers/csv_logs.py,
`_check_log_dir_exists`), so a resumed run kept only its own steps. `ResumableCSVLogger` continues the file
instead; rows the interrupted run logged after the checkpoint it resumes from (steps ≥ that checkpoint's global
step) do not belong to the resumed trajectory: they move to `metrics_superseded.csv` beside it, nothing is lost.
"""
from __future__ import annotations

import csv
import os

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

SUPERSEDED = "metrics_superseded.csv"


class ContinuingWriter(ExperimentWriter):
    """Lightning's writer, appending to an existing metrics.csv (its header read back) instead of deleting it."""

    def __init__(self, log_dir: str, resume_step: int | None = None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows, header = list(reader), list(reader.fieldnames or [])
        if self.resume_step is not None:
            later = [row for row in rows if _step(row) >= self.resume_step]
            if later:
                _append_rows(os.path.join(self.log_dir, SUPERSEDED), header, later)
                rows = [row for row in rows if _step(row) < self.resume_step]
        self.metrics_keys = sorted(header)
        _write_rows(self.metrics_file_path, self.metrics_keys, rows)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


def _write_rows(path: str, header: list[str], rows: list[dict]) -> None:
    partial = f"{path}.partial"
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


def _append_rows(path: str, header: list[str], rows: list[dict]) -> None:
    previous: list[dict] = []
    if os.path.isfile(path):
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            previous, header = list(reader), sorted(set(header) | set(reader.fieldnames or []))
    _write_rows(path, header, previous + rows)


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose metrics.csv survives a resume (see the module docstring). `resume_step`: the global step of
    the checkpoint the run resumes from (the recipe sets it, src/tomdistill/training.py), None for a fresh run."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment  # as Lightning's: the other ranks get a no-op writer
    def experiment(self) -> ContinuingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingWriter(log_dir=self.log_dir, resume_step=self.resume_step)
        return self._experiment
