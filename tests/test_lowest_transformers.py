"""The soft loss trains on the lowest transformers requirements.txt allows (below 5.21 it projects the kept
positions itself: src/tomdistill/model/lora_module.py, `kept_logits`). .ci/run installs that version into
.lowest-transformers (pip --target --no-deps); the step runs in a subprocess with it first on PYTHONPATH and
must give the loss the installed transformers gives."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, check, run_train, summary

ROOT = Path(__file__).resolve().parents[1]
LOWEST = ROOT / ".lowest-transformers"


def floor() -> str:
    match = re.search(r"^transformers>=([0-9.]+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert match, "requirements.txt: no transformers>= floor"
    return match.group(1)


def with_lowest(env: dict | None = None) -> dict:
    paths = [str(LOWEST), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return {**(env or {}), "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


pytestmark = pytest.mark.skipif(not LOWEST.is_dir(), reason=(
    ".lowest-transformers is not installed: .ci/run installs it (pip install --target .lowest-transformers --no-deps "
    "transformers==<requirements.txt floor> 'huggingface-hub>=1.5,<2.0')"))


def test_the_installed_lowest_version_is_the_floor():
    out = subprocess.run([sys.executable, "-c", "import transformers, tomdistill.model.lora_module as m; "
                          "print(transformers.__version__, m.NATIVE_MASK_SLICING)"],
                         env={**os.environ, **with_lowest()}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    version, native = out.stdout.split()
    assert version.split("+")[0] in (floor(), floor() + ".0"), (
        f".lowest-transformers holds transformers {version}, requirements.txt's floor is {floor()}: reinstall it")
    # what this test is for: the path that older transformers take
    assert native == str(tuple(int(x) for x in floor().split(".")[:2]) >= (5, 21))


def test_one_soft_step_on_the_lowest_transformers_equals_the_installed_one(tmp_path, teacher):
    args = [*TINY, "loss=soft", "trainer.max_steps=1", "trainer.val_check_interval=1", f"data.teacher={teacher}"]
    lowest = check(run_train([*args, f"output={tmp_path / 'lowest'}"], timeout=600, env=with_lowest()))
    assert "Traceback" not in lowest.stderr
    current = check(run_train([*args, f"output={tmp_path / 'current'}"], timeout=600))
    old, new = summary(tmp_path / "lowest"), summary(tmp_path / "current")
    assert old["global_step"] == new["global_step"] == 1
    for metric in ("train/soft_loss", "val/loss", "val/alignment"):
        assert abs(old["final_metrics"][metric] - new["final_metrics"][metric]) < 1e-4, (
            metric, old["final_metrics"][metric], new["final_metrics"][metric])
    meta = json.loads((tmp_path / "lowest" / "adapter" / "tomdistill_adapter.json").read_text())
    assert meta["training"]["loss"] == "soft"
