"""The configs: where they are (`CONFIG_DIR`), whether this process runs a job of a sweep, and the
OmegaConf resolvers they use, registered when this module is imported (every command imports it
for CONFIG_DIR, so before Hydra composes its config).

- `${fresh_dir:base}`: a run folder no other command has claimed (conf/hydra/default.yaml);
- `${direction:mode}`: Optuna's direction for checkpoint.mode (conf/hparams_search/optuna.yaml);
- `${run_name:}`, `${sweep_name:default}`: a run's and a sweep's names in MLflow and W&B (conf/logger/).
"""

from __future__ import annotations

import hashlib
import os
from itertools import count
from pathlib import Path

from omegaconf import OmegaConf

from xray_cls.core.errors import UserInputError

# conf/ sits beside the package in a source checkout and inside it in an installed wheel.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONFIG_DIR = next(p for p in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf") if p.is_dir())


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def fresh_dir(base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first of them that this call could create.

    Hydra names output folders to the second, so two commands started in the same second would
    share (and overwrite) one; creating the folder here claims it atomically. The answer is kept in
    the environment, because Hydra resolves the folder again in this process and in the processes
    a launcher starts for the jobs of a sweep (joblib, submitit), which must not claim another.
    """
    key = "XRAY_CLS_DIR_" + hashlib.sha256(base.encode()).hexdigest()[:16]
    if key not in os.environ:
        for i in count():
            candidate = Path(base if i == 0 else f"{base}_{i}")
            try:
                candidate.mkdir(parents=True)
            except FileExistsError:
                continue
            os.environ[key] = str(candidate)
            break
    return os.environ[key]


OmegaConf.register_new_resolver("fresh_dir", fresh_dir, replace=True)


def optimization_direction(mode: str) -> str:
    """`maximize` for checkpoint.mode=max, `minimize` for min: a sweeper optimizes what the run monitors."""
    directions = {"max": "maximize", "min": "minimize"}
    if mode not in directions:
        raise UserInputError(f"checkpoint.mode={mode!r} is not valid; expected min or max")
    return directions[mode]


OmegaConf.register_new_resolver("direction", optimization_direction, replace=True)


def run_name() -> str:
    """The run's overrides (`model=mlp,optimizer.lr=0.01`): its name in MLflow and W&B."""
    from hydra.core.hydra_config import HydraConfig

    name = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    return name or "defaults"


def sweep_name(default: str | None) -> str | None:
    """"xray_cls sweep <sweep folder>" in a multirun (the MLflow experiment and W&B group of its
    runs), `default` otherwise."""
    from hydra.core.hydra_config import HydraConfig

    if in_multirun():
        return f"xray_cls sweep {HydraConfig.get().sweep.dir}"
    return default


OmegaConf.register_new_resolver("run_name", run_name, replace=True)


OmegaConf.register_new_resolver("sweep_name", sweep_name, replace=True)
