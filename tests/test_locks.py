"""File locks on a filesystem without working flock (docs/cluster.md, "Shared filesystems and locks"): the
run stops with one line naming the file and the setting that moves it, not a traceback."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def refuse_flock(*_args, **_kwargs):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # NFS whose lock service does not run


def test_a_sweep_whose_trials_csv_cannot_be_locked_names_the_file_and_hydra_sweep_dir(tmp_path, monkeypatch):
    import fcntl

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from tomdistill.errors import UserError
    from tomdistill.training import record_trial

    sweep = tmp_path / "sweep"
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep}", "hydra.job.num=3"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(fcntl, "flock", refuse_flock)
    summary = {"objective": "val/alignment", "value": 0.5, "best_step": 1, "global_step": 2, "fit_seconds": 1.0,
               "final_metrics": {}}
    try:
        with pytest.raises(UserError) as refused:
            record_trial(summary, tmp_path / "trial")
    finally:
        HydraConfig.instance().cfg = None
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"cannot lock {sweep / 'trials.csv'} (No locks available)")
    assert "set hydra.sweep.dir to a directory on a node-local or lock-capable filesystem" in message
    assert 'docs/cluster.md, "Shared filesystems and locks"' in message


@pytest.mark.parametrize("where", ["model", "data"])
def test_a_cache_lock_the_filesystem_refuses_names_the_lock_and_paths_cache_dir(tmp_path, monkeypatch, where):
    import filelock

    from tomdistill.locks import LockError

    def refuse(self, *args, **kwargs):
        refuse_flock()

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    if where == "model":
        from tomdistill.model.loading import building_once

        lock_path, setting = tmp_path / "models" / ".snapshot.lock", "paths.cache_dir (or TOMDISTILL_CACHE)"
        context = building_once(tmp_path / "models" / "snapshot")
    else:
        from tomdistill.locks import file_lock

        lock_path, setting = tmp_path / "x.arrow.lock", "paths.cache_dir (data.cache_dir)"
        context = file_lock(lock_path, setting)
    with pytest.raises(LockError) as refused:
        with context:
            pass
    assert str(refused.value).startswith(f"cannot lock {lock_path} (No locks available)")
    assert f"set {setting} to a directory" in str(refused.value)


def test_the_tokenized_cache_lock_is_the_one_that_names_paths_cache_dir():
    source = (ROOT / "src/tomdistill/data/datamodule.py").read_text()
    assert 'file_lock(cache_file + ".lock", "paths.cache_dir (data.cache_dir)")' in source
    assert "FileLock(" not in source  # every lock goes through tomdistill.locks


def test_a_refused_lock_ends_an_app_with_one_line_and_exit_2(tmp_path):
    """As train.py reports it: run_app turns the LockError into `<app>: error: <message>`, exit code 2."""
    code = (
        "import errno, os\n"
        "from tomdistill.errors import run_app\n"
        "from tomdistill.locks import lock_refused\n"
        "def fail():\n"
        "    raise lock_refused('SWEEP/trials.csv', OSError(errno.ENOLCK, os.strerror(errno.ENOLCK)), "
        "'hydra.sweep.dir')\n"
        "run_app('train.py', fail)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # (before it: the same message logged, to the run's log)
        "train.py: error: cannot lock SWEEP/trials.csv (No locks available): its filesystem does not support "
        "flock; set hydra.sweep.dir to a directory on a node-local or lock-capable filesystem "
        '(docs/cluster.md, "Shared filesystems and locks")')


def test_a_lock_held_by_another_process_is_refused_naming_it_and_freed_when_it_exits(tmp_path):
    from tomdistill.locks import HeldElsewhere, held_by_this_process

    lock = tmp_path / ".pipeline.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tomdistill.locks import held_by_this_process as h\n"
         f"with h({str(lock)!r}, 'x'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HeldElsewhere) as refused:
            with held_by_this_process(lock, "study S"):
                pytest.fail("a second holder got the lock")
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"study S is being run by another process (pid {holder.pid} on ")
        assert str(lock) in message and "run this command again (it resumes)" in message
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with held_by_this_process(lock, "study S"):  # a killed holder leaves nothing to clear
        assert lock.read_text().startswith(f"pid {os.getpid()} on ")


def test_a_study_lock_on_a_filesystem_without_flock_warns_and_runs(tmp_path, monkeypatch, caplog):
    import fcntl

    from tomdistill.locks import held_by_this_process

    monkeypatch.setattr(fcntl, "flock", refuse_flock)
    ran = False
    with held_by_this_process(tmp_path / ".pipeline.lock", "study S"):
        ran = True
    assert ran and "not locked (No locks available)" in caplog.text
