"""Test-only fault injection, installed from outside: make one rank fail at one step, to test that every rank
stops with it. No module of tomdistill knows about it.

A test puts this folder first on PYTHONPATH and sets `TOMDISTILL_TEST_FAULT=KIND@RANK:STEP` (e.g. `nan@1:1`);
Python imports `sitecustomize` at start-up in every process (the ranks Lightning or torchrun start inherit the
environment), and this one patches tomdistill's modules as they are imported. KIND is one of
- `nan`: that rank's training loss becomes NaN at that global step (`LoRADistillModule.compute_losses`);
- `data`: that rank's training loader raises a `DataError` instead of its batch of that index;
- `hang`: that rank's training loader blocks for good instead (a stuck rank: the others wait in a collective).
Used by tests/faults/test_multirank.py (`faults.common.with_fault`).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading

VARIABLE = "TOMDISTILL_TEST_FAULT"
KINDS = ("nan", "data", "hang")


def injected(kind: str, rank: int, step: int) -> bool:
    """Whether the test environment asks for fault `kind` on `rank` at `step`."""
    spec = os.environ.get(VARIABLE)
    if not spec:
        return False
    wanted, _, where = spec.partition("@")
    if wanted not in KINDS:
        raise ValueError(f"{VARIABLE}={spec!r}: the kind must be one of {KINDS}")
    fault_rank, _, fault_step = where.partition(":")
    return wanted == kind and int(fault_rank) == rank and int(fault_step) == step


def patch_data_loader(module) -> None:
    """The rank's training batches, with the `hang` or `data` fault before the batch of that index."""
    loader = module.ResumableDataLoader
    original = loader._errors_as_batches

    def faulty(iterator, rank: int):
        index = 0
        while True:
            if injected("hang", rank, index):
                print(f"test fault: rank {rank} hangs", file=sys.stderr, flush=True)
                threading.Event().wait()
            if injected("data", rank, index):
                raise module.DataError(f"test fault: batch {index} of rank {rank} cannot be read")
            try:
                batch = next(iterator)
            except StopIteration:
                return
            index += 1
            yield batch

    def errors_as_batches(self, iterator):
        return original(self, faulty(iterator, self.rank))

    loader._errors_as_batches = errors_as_batches


def patch_module(module) -> None:
    """The training loss, NaN on the faulty rank at the faulty step."""
    cls = module.LoRADistillModule
    original = cls.compute_losses

    def compute_losses(self, batch, *args, **kwargs):
        out = original(self, batch, *args, **kwargs)
        if self.training and injected("nan", self.global_rank, self.global_step):
            out["loss"] = out["loss"] * float("nan")
        return out

    cls.compute_losses = compute_losses


PATCHES = {"tomdistill.data.datamodule": patch_data_loader, "tomdistill.model.lora_module": patch_module}


class _Patcher(importlib.abc.MetaPathFinder):
    """Finds the patched modules with the normal finder, then patches each right after it has run."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(VARIABLE):
    sys.meta_path.insert(0, _Patcher())
