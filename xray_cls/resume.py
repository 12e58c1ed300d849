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

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from xray_cls.errors import UserInputError

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
    file is not a checkpoint of ours, is not inside a run's checkpoints/ folder, or the run has
    already finished."""
    from xray_cls.checkpoint import read_checkpoint

    read_checkpoint(ckpt_path, "ckpt_path")
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


def check_same_network(ckpt_path: Path, net_cfg: dict[str, Any]) -> None:
    """A run resumes only with the network it was trained with: name both when they differ."""
    from xray_cls.checkpoint import check_state_dict, network_name, read_checkpoint

    checkpoint = read_checkpoint(ckpt_path, "ckpt_path")
    trained = checkpoint["hyper_parameters"]["net"]
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
    those that do not change the result."""
    saved = _in_run_folder(_flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))))
    current = _in_run_folder(_flatten(OmegaConf.to_container(cfg, resolve=True)))
    ignored = {"ckpt_path", "paths.output_dir", "data.cache_dir", "trainer.enable_progress_bar"}
    display = ("callbacks.progress_bar.",)  # how the run is shown, not what it computes
    return [
        k for k in sorted(saved.keys() | current.keys())
        if k not in ignored and not k.startswith(display) and saved.get(k) != current.get(k)
    ]


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


# --- the training state a resumed checkpoint hands to Lightning ---

MAX_STATE_ITEMS = 10_000  # entries of a mapping the run fills itself (ModelCheckpoint's best_k_models)
MAX_DEPTH = 12
LIGHTNING_VERSION = re.compile(r"\d+\.\d+(\.\d+)?([.+\-]?\w+)*")


def check_training_state(ckpt_path: Path, trainer: Any, module: Any) -> None:
    """Before Lightning restores a run from `ckpt_path`: every part it restores (the weights, the
    loops' counters, the optimizer and scheduler, the callbacks' states, the random generators) is
    what this run's own objects would write. Lightning trusts these and fails deep inside a restore
    (a KeyError, a shape mismatch at the first step) where the file is altered or damaged."""
    from xray_cls.checkpoint import read_checkpoint

    problem = training_state_problem(read_checkpoint(ckpt_path, "ckpt_path"), trainer, module)
    if problem:
        raise UserInputError(f"ckpt_path={ckpt_path} cannot be resumed: {problem}; expected the last.ckpt of an interrupted "
                             "xray_cls run, as it wrote it")


def training_state_problem(checkpoint: dict[str, Any], trainer: Any, module: Any) -> str | None:
    version = checkpoint.get("pytorch-lightning_version")
    if not isinstance(version, str) or not LIGHTNING_VERSION.fullmatch(version[:40]):
        return "it records no Lightning version (pytorch-lightning_version)"
    for key in ("epoch", "global_step"):
        if type(checkpoint.get(key)) is not int or checkpoint[key] < 0:
            return f"{key} is {_text(checkpoint.get(key))}, not a count"
    return (
        weights_problem(checkpoint["state_dict"], module)
        or conforms({name: loop.state_dict() for name, loop in loops(trainer).items()}, checkpoint.get("loops"), "loops")
        or optimizer_problem(module, checkpoint.get("optimizer_states"), checkpoint.get("lr_schedulers"))
        or callbacks_problem(trainer, checkpoint.get("callbacks"))
        or rng_problem(checkpoint.get("rng_states"))
    )


def loops(trainer: Any) -> dict[str, Any]:
    return {"fit_loop": trainer.fit_loop, "validate_loop": trainer.validate_loop, "test_loop": trainer.test_loop,
            "predict_loop": trainer.predict_loop}


def weights_problem(state: Any, module: Any) -> str | None:
    """Exactly the module's tensors, each of its shape (the network's alone are checked when it is built)."""
    own = module.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "its state_dict is not a mapping of names to tensors"
    differ = sorted(k for k in own.keys() | state.keys() if k not in own or k not in state or own[k].shape != state[k].shape)
    return f"its state_dict differs from this run's module at {str(differ[0])[:100]}" if differ else None


def optimizer_problem(module: Any, optimizer_states: Any, schedulers: Any) -> str | None:
    """One optimizer state that this run's optimizer loads (its groups and parameters), each
    parameter's state a tensor of that parameter's shape (or a scalar); the schedulers' states
    those of this run's schedulers."""
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    own_schedulers = [configured["lr_scheduler"]["scheduler"]] if isinstance(configured, dict) else []
    if not isinstance(optimizer_states, list) or len(optimizer_states) != 1 or not isinstance(optimizer_states[0], dict):
        return "optimizer_states is not the state of one optimizer"
    state = optimizer_states[0]
    problem = conforms(optimizer.state_dict()["param_groups"], state.get("param_groups"), "optimizer_states.param_groups")
    if problem:
        return problem
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    per_parameter = state.get("state")
    if not isinstance(per_parameter, dict) or not set(per_parameter) <= set(range(len(parameters))):
        return "optimizer_states.state is not a state per parameter of this run's optimizer"
    for index, values in per_parameter.items():
        shape = parameters[index].shape
        if not isinstance(values, dict) or not all(isinstance(t, torch.Tensor) and t.shape in (shape, torch.Size([]))
                                                   and t.dtype.is_floating_point for t in values.values()):
            return f"optimizer_states.state[{index}] does not fit its parameter of shape {list(shape)}"
    try:  # what the checks above cannot see (an Adam state without its step count) fails here, not in fit
        optimizer.load_state_dict(state)
    except Exception as err:  # noqa: BLE001  torch's loaders fail in many ways on a hostile state
        return f"optimizer_states does not load into this run's optimizer ({type(err).__name__}: {str(err)[:80]})"
    if not isinstance(schedulers, list) or len(schedulers) != len(own_schedulers):
        return f"lr_schedulers is not the state of this run's {len(own_schedulers)} scheduler(s)"
    for i, (own, held) in enumerate(zip(own_schedulers, schedulers)):
        problem = conforms(own.state_dict(), held, f"lr_schedulers[{i}]")
        if problem:
            return problem
    return None


def callbacks_problem(trainer: Any, states: Any) -> str | None:
    """Each state of a callback this run has, shaped as that callback's own state."""
    if not isinstance(states, dict):
        return "callbacks is not a mapping of callback states"
    for callback in trainer.callbacks:
        key = callback.state_key
        if key in states:
            problem = conforms(callback.state_dict(), states[key], f"callbacks[{str(key)[:60]}]")
            if problem:
                return problem
    return None


def rng_problem(states: Any) -> str | None:
    """The random generators' states, as ResumableTraining saves them (absent: only a warning)."""
    if states is None:
        return None
    own = torch.get_rng_state()
    if not isinstance(states, dict) or not isinstance(states.get("torch"), torch.Tensor) or states["torch"].shape != own.shape \
            or states["torch"].dtype != own.dtype:
        return "rng_states.torch is not a state of torch's random generator"
    cuda = states.get("cuda")
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
        return "rng_states.cuda is not a list of CUDA generator states"
    return None


def conforms(reference: Any, value: Any, where: str, depth: int = 0) -> str | None:
    """What in `value` is not shaped as `reference` (a fresh object's state): the same keys (more
    are let through, as Lightning ignores them), lists of the same length, values of the same kind
    (a tensor of the same shape; a count >= 0 under loops). None when it conforms. An empty mapping
    (one the run fills, such as best_k_models) takes names to plain values or scalar tensors."""
    if depth > MAX_DEPTH:
        return f"{where} nests deeper than {MAX_DEPTH} levels"
    if isinstance(reference, dict):
        if not isinstance(value, dict):
            return f"{where} is {_text(value)}, not a mapping"
        if not reference:
            ok = len(value) <= MAX_STATE_ITEMS and all(isinstance(k, str) and _is_leaf(v) for k, v in value.items())
            return None if ok else f"{where} is not a mapping of names to values"
        for key, expected in reference.items():
            if key not in value:
                return f"{where}.{key} is missing"
            problem = conforms(expected, value[key], f"{where}.{key}", depth + 1)
            if problem:
                return problem
        return None
    if isinstance(reference, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            return f"{where} is {_text(value)}, not a list of {len(reference)}"
        return next((p for p in (conforms(r, v, f"{where}[{i}]", depth + 1) for i, (r, v) in enumerate(zip(reference, value))) if p), None)
    if isinstance(reference, torch.Tensor):
        ok = isinstance(value, torch.Tensor) and value.shape == reference.shape
        return None if ok else f"{where} is {_text(value)}, not a tensor of shape {list(reference.shape)}"
    if isinstance(reference, str):
        return None if isinstance(value, str) and len(value) <= 4096 else f"{where} is {_text(value)}, not a string"
    if isinstance(reference, bool):
        return None if isinstance(value, bool) else f"{where} is {_text(value)}, not true or false"
    if reference is None:
        return None if _is_leaf(value) else f"{where} is {_text(value)}, not a plain value"
    if isinstance(reference, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and where.startswith("loops") and isinstance(reference, int):
            ok = isinstance(value, int) and value >= 0
        return None if ok else f"{where} is {_text(value)}, not a {'count' if where.startswith('loops') else 'number'}"
    return None  # a kind Lightning passes through without reading


def _is_leaf(value: Any) -> bool:
    """A plain value, or a scalar tensor (a score)."""
    if isinstance(value, torch.Tensor):
        return value.numel() <= 1
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 4096)


def _text(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return repr(value)[:40]
