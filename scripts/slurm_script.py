"""Print the sbatch script that `python train.py -m hydra/launcher=slurm ...` would submit, without submitting.

    python scripts/slurm_script.py trainer=ddp trainer.devices=8 trainer.num_nodes=2 hydra.launcher.nodes=2 \
        hydra.launcher.partition=gpu hydra.launcher.timeout_min=600

The arguments are train.py's overrides (hydra/launcher=slurm is added). The parameters go through the same
path as hydra-submitit-launcher's (its launcher object, submitit's AutoExecutor for "slurm"), and submitit
writes the script text; nothing needs a cluster. Useful to check resources before queueing, and in tests.
"""
from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sbatch_script(overrides: list[str]) -> str:
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    import train  # noqa: F401  (registers train.py's resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the launcher's ${hydra.sweep.dir} and ${run_name} resolve here
    params = instantiate(cfg.hydra.launcher).params
    # the mapping hydra-submitit-launcher's launch() applies before it submits; submitit's one check that
    # needs a cluster (is `srun` on PATH?) is answered yes, since nothing is submitted
    with mock.patch.object(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1)):
        executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                         slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    command = " ".join([sys.executable, "-u", "-m", "submitit.core._submit", str(executor.folder)])
    return executor._executor._make_submission_file_text(command, "%j")


if __name__ == "__main__":
    print(sbatch_script(sys.argv[1:]))
