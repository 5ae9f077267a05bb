"""Ask a model (or the oracle) every scenario many times and store what it said.

    python sample.py                                   # SmolLM2-135M-Instruct on CPU, student role
    python sample.py sampler=oracle role=teacher       # the analytic reference teacher
    python sample.py sampler.mode=score                # exact action probabilities
    torchrun --nproc_per_node 8 sample.py model=llama2_7b   # data-parallel over 8 ranks

Writes parquet shards and manifest.json into `output` (default: the Hydra run directory); see
conf/sample.yaml and conf/sampler/hf.yaml for the settings.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from tomdistill.paths import refuse_unsafe_output_override, register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from tomdistill.config_schema import APP_GROUPS, check_config
    from tomdistill.errors import run_app
    from tomdistill.study import refuse_evaluation_only

    run_app("sample.py", refuse_evaluation_only, cfg, "sample.py")  # e.g. +experiment=paper_published
    run_app("sample.py", check_config, cfg, APP_GROUPS["sample"])  # a bad key: one line before any model loads
    from tomdistill.sampling import run

    run_app("sample.py", run, cfg)


if __name__ == "__main__":
    refuse_unsafe_output_override(sys.argv[1:], "sample.py")  # before Hydra creates its run directory at `output`
    main()
