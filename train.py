"""Fine-tune a student on a teacher's answers (LoRA). `python train.py --help` lists the config groups.

    python train.py                                  # SmolLM2-135M on the oracle teacher, CPU, minutes
    python train.py +experiment=paper                # LLaMa2-7b student, DeepSpeed ZeRO-2, bf16
    python train.py output=DIR ckpt_path=last        # resume an interrupted run
    python train.py -m hparams_search=lora_optuna    # Optuna sweep on val/alignment
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tomdistill.paths import refuse_unsafe_output_override, register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from tomdistill.errors import run_app
    from tomdistill.study import refuse_evaluation_only

    run_app("train.py", refuse_evaluation_only, cfg, "train.py")  # e.g. +experiment=paper_published
    from tomdistill.training import train

    return run_app("train.py", train, cfg)


if __name__ == "__main__":
    refuse_unsafe_output_override(sys.argv[1:], "train.py")  # before Hydra creates its run directory at `output`
    main()
