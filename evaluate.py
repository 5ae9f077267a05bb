"""Evaluate transfer: how far fine-tuning moved the student toward the teacher.

    python evaluate.py teacher=DIR base=DIR tuned=DIR [output=DIR] [compare=paper_published] [logger=wandb]
    python evaluate.py +experiment=paper_published
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from tomdistill.paths import refuse_unsafe_output_override, register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg) -> None:
    from tomdistill.errors import run_app
    from tomdistill.evaluation import evaluate

    run_app("evaluate.py", evaluate, cfg)


if __name__ == "__main__":
    refuse_unsafe_output_override(sys.argv[1:], "evaluate.py")  # before Hydra creates its run directory at `output`
    main()
