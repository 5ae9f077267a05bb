"""The GPU check's tests: `pytest -m gpu tests/gpu`, run by scripts/gpu_check.sh on a CUDA machine.

Every test here is marked `gpu` and skipped where CUDA is not available (CI, laptops). tests/conftest.py
hides the GPUs (CUDA_VISIBLE_DEVICES='') when that variable is unset: scripts/gpu_check.sh sets it, as must
anyone who runs these tests by hand (`CUDA_VISIBLE_DEVICES=0 pytest -m gpu tests/gpu`; the overlay fit also needs
GPU_CHECK_OVERLAY, the folder gpu_check.sh installs the carried transformers into).

With $GPU_CHECK_RESULTS set, each test's outcome, seconds and recorded properties (tokens_per_s, gpu_mem_gb,
note: `record_property`) are appended there as JSON lines for the check's summary table.
Runs go to $GPU_CHECK_WORKDIR/runs (default: pytest's temporary directory).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import gpu_runs
from gpucheck import append_result

_CUDA: bool | None = None


def cuda_available() -> bool:
    global _CUDA
    if _CUDA is None:
        import torch

        _CUDA = bool(torch.cuda.is_available())
    return _CUDA


MODULE_ORDER = ("test_gpu_train.py", "test_gpu_sample.py")  # the device checks first, sampling last


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    mine = [i for i, item in enumerate(items) if here in Path(str(item.fspath)).resolve().parents]
    ordered = sorted((items[i] for i in mine), key=lambda item: MODULE_ORDER.index(Path(str(item.fspath)).name)
                     if Path(str(item.fspath)).name in MODULE_ORDER else len(MODULE_ORDER))  # stable
    for slot, item in zip(mine, ordered):
        items[slot] = item
    for item in ordered:
        if item.get_closest_marker("gpu") is not None:
            if not cuda_available():
                hidden = os.environ.get("CUDA_VISIBLE_DEVICES") == ""
                item.add_marker(pytest.mark.skip(
                    reason="no CUDA device" + (" (CUDA_VISIBLE_DEVICES is empty: tests/conftest.py hides GPUs "
                                               "unless it is set; scripts/gpu_check.sh sets it)" if hidden else "")))


# ------------------------------------------------------------------------------ results for the summary
_OUTCOMES: dict[str, dict] = {}


def pytest_runtest_logreport(report):
    results = os.environ.get("GPU_CHECK_RESULTS")
    if not results:
        return
    entry = _OUTCOMES.setdefault(report.nodeid, {"seconds": 0.0, "status": "passed", "note": ""})
    entry["seconds"] += report.duration
    if report.failed and entry["status"] != "failed":
        entry["status"] = "failed"
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        entry["note"] = f"{report.when}: {message.splitlines()[0] if message else ''}"[:160]
    elif report.skipped and entry["status"] == "passed":
        entry["status"] = "skipped"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        entry["note"] = str(reason)[:160]
    if report.when == "teardown":
        properties = dict(report.user_properties)
        row = {"name": "pytest " + report.nodeid.split("::", 1)[-1], **entry}
        for key in ("tokens_per_s", "gpu_mem_gb"):
            if properties.get(key) is not None:
                row[key] = float(properties[key])
        if properties.get("note") and entry["status"] == "passed":
            row["note"] = str(properties["note"])[:160]
        append_result(Path(results), row)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    base = os.environ.get("GPU_CHECK_WORKDIR")
    path = Path(base) / "runs" if base else tmp_path_factory.mktemp("gpu-check")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def gpu_teacher(workdir, catalogue) -> Path:
    """The oracle teacher's samples (2 answers + exact scores per in-sample scenario), as the CPU tests use."""
    from helpers import write_teacher

    directory = workdir / "teacher"
    if directory.exists():
        shutil.rmtree(directory)
    return write_teacher(directory, catalogue, n=2)


@dataclass
class FitRun:
    output: Path
    probe: dict        # train_probe.py's report
    log: str           # the run's stdout and stderr
    overlay: str | None


class Runs:
    """Each train.py / sample.py run once per session, shared by the tests that read it; a failed run is
    remembered and re-raised (not run again) for every later test that needs it."""

    def __init__(self, workdir: Path, teacher: Path):
        self.workdir, self.teacher = workdir, teacher
        self.done: dict[str, object] = {}

    def _once(self, key: str, make):
        if key not in self.done:
            try:
                self.done[key] = make()
            except BaseException as err:  # noqa: BLE001 - remembered, re-raised below
                self.done[key] = err
        value = self.done[key]
        if isinstance(value, BaseException):
            raise AssertionError(f"the {key} run failed earlier in this session: {str(value)[:4000]}") from value
        return value

    def fresh(self, name: str) -> Path:
        path = self.workdir / name
        if path.exists():
            shutil.rmtree(path)
        return path

    def fit(self, name: str) -> FitRun:
        """The fit NAME of gpu_runs.FITS, through train_probe.py (its report and the run's log kept)."""
        def make():
            hung = [k for k, v in self.done.items() if k.startswith("train") and isinstance(v, gpu_runs.RunTimeout)]
            if hung:  # the same hang again would eat the check's time budget before sampling runs
                raise AssertionError(f"not started: {hung[0]} ran past {gpu_runs.STEP_TIMEOUT} s earlier")
            overlay = None
            if name in gpu_runs.OVERLAY_FITS:
                overlay = os.environ.get("GPU_CHECK_OVERLAY")
                if not overlay or not Path(overlay).is_dir():
                    raise AssertionError(f"GPU_CHECK_OVERLAY={overlay!r} is not a folder: scripts/gpu_check.sh "
                                         "installs the bundle's overlay wheels there")
            output = self.fresh(name)
            result = gpu_runs.run_script("train.py", gpu_runs.train_overrides(name, output, self.teacher),
                                         log=self.workdir / "logs" / f"train_{name}.log", probe=True, overlay=overlay)
            return FitRun(output, gpu_runs.probe_report(result), result.stdout + result.stderr, overlay)

        return self._once(f"train[{name}]", make)

    def train(self, name: str) -> Path:
        return self.fit(name).output

    def sample(self, mode: str, adapter: Path | None = None) -> tuple[Path, float | None]:
        name = f"sample_{mode}" + ("_adapter" if adapter else "")

        def make():
            output = self.fresh(name)
            result = gpu_runs.run_script("sample.py", gpu_runs.sample_overrides(mode, output, adapter),
                                         log=self.workdir / "logs" / f"{name}.log", peak=True)
            return output, gpu_runs.peak_memory(result)

        return self._once(name, make)


@pytest.fixture(scope="session")
def runs(workdir, gpu_teacher) -> Runs:
    return Runs(workdir, gpu_teacher)
