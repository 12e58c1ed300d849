"""The training state a resumed checkpoint hands to Lightning, checked before Lightning restores it:
the weights, the loops' counters, the optimizer and schedulers, the callbacks' states and the
random generators must be what this run's own objects would write."""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from xray_cls.core.errors import UserInputError

log = logging.getLogger(__name__)


MAX_STATE_ITEMS = 10_000  # entries of a mapping the run fills itself (ModelCheckpoint's best_k_models)
MAX_DEPTH = 12
LIGHTNING_VERSION = re.compile(r"\d+\.\d+(\.\d+)?([.+\-]?\w+)*")


def check_training_state(ckpt_path: Path, checkpoint: dict[str, Any], trainer: Any, module: Any) -> None:
    """Before Lightning restores a run from `ckpt_path` (read as `checkpoint`): every part it
    restores (the weights, the loops' counters, the optimizer and scheduler, the callbacks' states,
    the random generators) is what this run's own objects would write. Lightning trusts these and
    fails deep inside a restore (a KeyError, a shape mismatch at the first step) where the file is
    altered or damaged. The checkpoint is first migrated as Lightning migrates it, so that one of
    an earlier Lightning version is checked in today's layout."""
    from lightning.pytorch.utilities.migration import migrate_checkpoint

    version = checkpoint.get("pytorch-lightning_version")
    if not isinstance(version, str) or not LIGHTNING_VERSION.fullmatch(version[:40]):
        problem = "it records no Lightning version (pytorch-lightning_version)"
    else:
        try:
            migrated, problem = migrate_checkpoint(copy.deepcopy(checkpoint))[0], None
        except Exception as err:  # noqa: BLE001  Lightning's migrations assume its own layout
            migrated, problem = None, f"Lightning cannot migrate it ({type(err).__name__}: {str(err)[:80]})"
        problem = problem or training_state_problem(migrated, trainer, module)
    if problem:
        raise UserInputError(f"ckpt_path={ckpt_path} cannot be resumed: {problem}; expected the last.ckpt of an interrupted "
                             "xray_cls run, as it wrote it")


def training_state_problem(checkpoint: dict[str, Any], trainer: Any, module: Any) -> str | None:
    for key in ("epoch", "global_step"):
        if type(checkpoint.get(key)) is not int or checkpoint[key] < 0:
            return f"{key} is {_text(checkpoint.get(key))}, not a count"
    return (
        weights_problem(checkpoint["state_dict"], module)
        or conforms({name: loop.state_dict() for name, loop in loops(trainer).items()}, checkpoint.get("loops"), "loops")
        or optimizer_problem(module, checkpoint.get("optimizer_states"), checkpoint.get("lr_schedulers"))
        or callbacks_problem(trainer, checkpoint.get("callbacks"))
        or rng_problem(checkpoint.get("rng_states"), "rng_states")
        or ranks_problem(checkpoint.get("rng_states_per_rank"))
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
    """One optimizer state that this run's optimizer loads (its groups and parameters) and takes a
    step with; the schedulers' states those of this run's schedulers. Keys that the run's own
    objects have and the file lacks are let through: torch fills in the defaults of an older release."""
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    own_schedulers = [configured["lr_scheduler"]["scheduler"]] if isinstance(configured, dict) else []
    if not isinstance(optimizer_states, list) or len(optimizer_states) != 1 or not isinstance(optimizer_states[0], dict):
        return "optimizer_states is not the state of one optimizer"
    state = optimizer_states[0]
    problem = conforms(optimizer.state_dict()["param_groups"], state.get("param_groups"), "optimizer_states.param_groups",
                       optional=True)
    if problem:
        return problem
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    per_parameter = state.get("state")
    if not isinstance(per_parameter, dict) or not set(per_parameter) <= set(range(len(parameters))):
        return "optimizer_states.state is not a state per parameter of this run's optimizer"
    return trial_step(optimizer, state, parameters) or schedulers_problem(own_schedulers, schedulers)


def trial_step(optimizer: Any, state: dict[str, Any], parameters: list[torch.Tensor]) -> str | None:
    """The state loaded into this run's optimizer, and one step taken with zero gradients: what fit's
    first step would meet (an Adam state without its step count, a moment of another shape).
    The step changes the new module's own weights, which the resume then replaces with the file's."""
    try:
        optimizer.load_state_dict(state)
        for parameter in parameters:
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step(lambda: torch.zeros(()))
    except Exception as err:  # noqa: BLE001  torch's optimizers fail in many ways on a hostile state
        return f"optimizer_states does not work with this run's optimizer ({type(err).__name__}: {str(err)[:80]})"
    finally:
        for parameter in parameters:
            parameter.grad = None
    return None


def schedulers_problem(own_schedulers: list[Any], schedulers: Any) -> str | None:
    """One state per scheduler of this run, shaped as that scheduler's own."""
    if not isinstance(schedulers, list) or len(schedulers) != len(own_schedulers):
        return f"lr_schedulers is not the state of this run's {len(own_schedulers)} scheduler(s)"
    for i, (own, held) in enumerate(zip(own_schedulers, schedulers)):
        problem = conforms(own.state_dict(), held, f"lr_schedulers[{i}]", optional=True)
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


def rng_problem(states: Any, where: str) -> str | None:
    """The random generators' states, as ResumableTraining saves them (absent: only a warning)."""
    if states is None:
        return None
    own = torch.get_rng_state()
    if not isinstance(states, dict) or not isinstance(states.get("torch"), torch.Tensor) or states["torch"].shape != own.shape \
            or states["torch"].dtype != own.dtype:
        return f"{where}.torch is not a state of torch's random generator"
    cuda, shape = states.get("cuda"), torch.cuda.get_rng_state().shape if torch.cuda.is_available() else None
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and (shape is None or t.shape == shape)
                                             for t in cuda):
        return f"{where}.cuda is not a list of CUDA generator states"
    return seeded_generators_problem(states, where)


def seeded_generators_problem(states: dict[str, Any], where: str) -> str | None:
    """numpy's and Python's generator states, as ResumableTraining saves them (absent from older checkpoints)."""
    numpy_state, python_state = states.get("numpy"), states.get("python")
    if numpy_state is not None and not (
            isinstance(numpy_state, dict) and isinstance(numpy_state.get("keys"), torch.Tensor) and numpy_state["keys"].shape == (624,)
            and numpy_state["keys"].dtype == torch.int64 and bool(((numpy_state["keys"] >= 0) & (numpy_state["keys"] < 2**32)).all())
            and type(numpy_state.get("position")) is int and 0 <= numpy_state["position"] <= 624
            and type(numpy_state.get("has_gauss")) is int and type(numpy_state.get("gauss")) is float):
        return f"{where}.numpy is not a state of numpy's random generator"
    if python_state is not None and not (
            isinstance(python_state, dict) and python_state.get("version") == 3 and isinstance(python_state.get("internal"), torch.Tensor)
            and python_state["internal"].shape == (625,) and python_state["internal"].dtype == torch.int64
            and bool(((python_state["internal"] >= 0) & (python_state["internal"] < 2**32)).all()) and int(python_state["internal"][-1]) <= 624
            and type(python_state.get("gauss")) in (float, type(None))):
        return f"{where}.python is not a state of Python's random generator"
    return None


def ranks_problem(per_rank: Any) -> str | None:
    """Every DDP process's random states (absent: a checkpoint of one process)."""
    if per_rank is None:
        return None
    if not isinstance(per_rank, list) or len(per_rank) > 4096:
        return "rng_states_per_rank is not a list of each process's random states"
    return next((p for p in (rng_problem(s, f"rng_states_per_rank[{i}]") for i, s in enumerate(per_rank)) if p), None)


def conforms(reference: Any, value: Any, where: str, depth: int = 0, optional: bool = False) -> str | None:
    """What in `value` is not shaped as `reference` (a fresh object's state): the same keys (more
    are let through, as Lightning ignores them), lists of the same length, values of the same kind
    (a tensor of the same shape; a count >= 0 under loops). None when it conforms. An empty mapping
    (one the run fills, such as best_k_models) takes names to plain values or scalar tensors.
    `optional`: keys the file lacks are let through (the loader fills in its defaults)."""
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
                if optional:
                    continue
                return f"{where}.{key} is missing"
            problem = conforms(expected, value[key], f"{where}.{key}", depth + 1, optional)
            if problem:
                return problem
        return None
    if isinstance(reference, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            return f"{where} is {_text(value)}, not a list of {len(reference)}"
        return next((p for p in (conforms(r, v, f"{where}[{i}]", depth + 1, optional) for i, (r, v) in enumerate(zip(reference, value)))
                     if p), None)
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
