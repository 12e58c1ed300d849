"""Interrupting a run and resuming it (`ckpt_path=`) to the result an uninterrupted run would give.

Lightning restores weights, optimizer, scheduler, loop counters and callback state. On one device
two more things make the continuation exact:
- every checkpoint carries the random generators (augmentation, dropout), restored on resume
  (`callbacks.ResumableTraining`, which also turns Ctrl+C into a checkpoint);
- each epoch's train order depends only on the seed and the epoch (`data.EpochShuffle`), and an
  epoch resumed from a mid-epoch checkpoint skips the batches it already trained on.
Ctrl+C (SIGINT) saves such a checkpoint as last.ckpt after the current batch, then stops the run;
a run killed outright (SIGKILL, a lost node) resumes from the last.ckpt of its last whole epoch.
Under DDP every process keeps its own generators: all of them go into the checkpoint, and each
process gets its own back, so a DDP run resumed from an epoch-end checkpoint is exact too.

A SLURM job that the scheduler restarts (preemption, `scontrol requeue`, a failed node) runs the
same command again in the same run folder: `requeued_checkpoint` finds the run's last.ckpt there,
so the job continues its run instead of refusing the folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xray_cls.core.errors import UserInputError
from xray_cls.core.legacy_names import canonical

log = logging.getLogger(__name__)


def requeued_checkpoint(cfg: DictConfig) -> Path | None:
    """In a SLURM job that the scheduler has restarted, the last.ckpt that an earlier start of this
    job left in its run folder, if that run is unfinished and of the same config; otherwise None
    (and a folder holding a finished run or another config is refused as ever)."""
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    run_dir = Path(cfg.paths.output_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file() or not (run_dir / "config.yaml").is_file() or (run_dir / "metrics.json").exists():
        return None
    changed = config_changes(run_dir, cfg)
    if changed:
        log.warning("the run folder %s holds a run of another config (%s): not resuming it", run_dir, ", ".join(changed))
        return None
    log.info("SLURM restarted this job (restart %s): continuing its run from %s", os.environ["SLURM_RESTART_COUNT"], last)
    return last


def resume_folder(ckpt_path: Path) -> Path:
    """The run folder a checkpoint belongs to, where the resumed run carries on. Refused when the
    checkpoint (read and checked by the caller) is not inside a run's checkpoints/ folder, or the
    run has already finished."""
    run_dir = ckpt_path.parent.parent
    if ckpt_path.parent.name != "checkpoints" or not (run_dir / "config.yaml").is_file():
        raise UserInputError(
            f"ckpt_path={ckpt_path} is not inside a run folder (<run>/checkpoints/ beside <run>/config.yaml); "
            "resume from the checkpoints of the interrupted run itself"
        )
    if (run_dir / "metrics.json").exists():
        raise UserInputError(
            f"ckpt_path={ckpt_path}: the run {run_dir} has already finished (it has metrics.json); "
            "resuming it would overwrite its results, and ckpt_path= only continues interrupted runs"
        )
    return run_dir.absolute()


def check_same_network(ckpt_path: Path, checkpoint: dict[str, Any], net_cfg: dict[str, Any]) -> None:
    """A run resumes only with the network it was trained with (`checkpoint`, read from
    `ckpt_path`): name both when they differ."""
    from xray_cls.models.networks import canonical_config
    from xray_cls.models.untrusted_files import check_state_dict, network_name

    trained, net_cfg = canonical_config(checkpoint["hyper_parameters"]["net"]), canonical_config(net_cfg)
    if trained != net_cfg:
        differ = sorted(k for k in trained.keys() | net_cfg.keys() if trained.get(k) != net_cfg.get(k))
        raise UserInputError(
            f"ckpt_path={ckpt_path} was trained with model {network_name(trained)} but this run is configured "
            f"with {network_name(net_cfg)} (differing: {', '.join(f'{k}={trained.get(k)!r} vs {net_cfg.get(k)!r}' for k in differ)}); "
            "resume with the overrides the run was started with (see its config.yaml)"
        )
    check_state_dict(trained, checkpoint["state_dict"], f"ckpt_path={ckpt_path}")


def config_changes(run_dir: Path, cfg: DictConfig) -> list[str]:
    """The settings (dotted keys) in which `cfg` differs from the run's own config.yaml, apart from
    those that do not change the result; a `_target_` of the flat layout (a run written before the
    layer folders) is compared in today's name."""
    saved = _in_run_folder(_flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))))
    current = _in_run_folder(_flatten(OmegaConf.to_container(cfg, resolve=True)))
    saved, current = ({k: canonical(v) if k.endswith("_target_") else v for k, v in flat.items()} for flat in (saved, current))
    ignored = {"ckpt_path", "paths.output_dir", "data.cache_dir", "trainer.enable_progress_bar"}
    display = ("callbacks.progress_bar.",)  # how the run is shown, not what it computes
    return [
        k for k in sorted(saved.keys() | current.keys())
        if k not in ignored and not k.startswith(display) and saved.get(k, ADDED.get(k)) != current.get(k)
    ]


# Options added to configs after runs were written, at the values that change nothing: a run's
# config.yaml without them holds them at these.
ADDED = {"model.weights": None, "model.freeze_epochs": 0, "model.backbone_lr_scale": 1.0}


def _in_run_folder(flat: dict[str, Any]) -> dict[str, Any]:
    """Paths inside the run folder (checkpoints/, the loggers' folders) written relative to it, so
    that a moved or copied run folder compares equal to where it was written."""
    out_dir = str(flat.get("paths.output_dir") or "")
    if not out_dir:
        return flat
    return {k: v.replace(out_dir, "<run>") if isinstance(v, str) else v for k, v in flat.items()}


def warn_config_changes(run_dir: Path, cfg: DictConfig) -> None:
    """Settings that differ from the run's own config.yaml make the result differ from an uninterrupted run."""
    changed = config_changes(run_dir, cfg)
    if changed:
        log.warning(
            "resuming with settings that differ from %s in: %s; the result will differ from an uninterrupted run",
            run_dir / "config.yaml", ", ".join(changed),
        )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


@dataclass
class RunFolder:
    path: Path
    resume_from: Path | None = None  # the checkpoint the run continues from
    asked_to_resume: bool = False  # ckpt_path= (else a SLURM job the scheduler restarted, or a new run)
    checkpoint: dict[str, Any] | None = None  # resume_from, read (and checked) once for every check before the resume


def locate_run_folder(cfg: DictConfig, read: Callable[[Path, str], dict[str, Any]] | None = None) -> RunFolder:
    """The run's folder: paths.output_dir, or the folder of the run it resumes, whose checkpoint
    `read` reads and checks (a classifier's: models.checkpoints.read_checkpoint)."""
    from xray_cls.models.checkpoints import read_checkpoint

    asked = bool(cfg.get("ckpt_path"))
    resume_from = Path(cfg.ckpt_path).expanduser() if asked else requeued_checkpoint(cfg)
    if resume_from is None:
        return RunFolder(Path(cfg.paths.output_dir))
    checkpoint = (read or read_checkpoint)(resume_from, "ckpt_path")
    path = resume_folder(resume_from)  # the run carries on in its own folder: checkpoints, loggers, curves.csv
    cfg.paths.output_dir = str(path)
    return RunFolder(path, resume_from, asked, checkpoint)


def stop_advice(folder: RunFolder) -> Any:
    """SIGINT or SIGTERM in any phase (reading, fitting, the val choices, the test, the report)
    ends the run in one line: resume from its last.ckpt once one exists, else run it again."""
    from lightning.pytorch.utilities import rank_zero_only

    from xray_cls.runtime.interrupts import interruptible

    def advice() -> str:
        last = folder.path / "checkpoints" / "last.ckpt"
        if (folder.path / "metrics.json").is_file():  # a signal in the last moments: the run is complete
            return f"the run had finished: its results are in {folder.path / 'metrics.json'}"
        if last.is_file():
            return f"the run is unfinished (no metrics.json); resume with the same overrides and ckpt_path={last}"
        return "no checkpoint was written yet; run the command again"

    # DDP's other processes are stopped by Lightning's own handling, with the first one.
    return interruptible(advice) if rank_zero_only.rank == 0 else contextlib.nullcontext()


def log_to_run_folder(run_dir: Path, name: str = "train.log") -> None:
    """A resumed run's log continues in its own log file (`name`), beside the resuming command's."""
    handler = logging.FileHandler(run_dir / name, errors="backslashreplace")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    logging.getLogger().addHandler(handler)
