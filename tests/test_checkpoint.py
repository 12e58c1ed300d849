"""A run's checkpoint carries what a trained model needs, and foreign or broken files are refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from xray_cls.core.errors import UserInputError
from xray_cls.data import PneumoniaMNISTDataModule, normalize
from xray_cls.evaluate import evaluate
from xray_cls.models.checkpoints import load_classifier, read_checkpoint
from xray_cls.predict import predict

from conftest import compose_config, run_cli


def test_checkpoint_carries_preprocessing_and_the_chosen_threshold(cnn_run: Path) -> None:
    metrics = json.loads((cnn_run / "metrics.json").read_text())
    hparams = read_checkpoint(cnn_run / "checkpoints" / "best.ckpt")["hyper_parameters"]
    assert metrics["threshold_rule"]["rule"] == "youden"
    assert hparams["threshold"] == metrics["threshold"] != 0.5
    assert hparams["threshold_rule"] == metrics["threshold_rule"]
    data = PneumoniaMNISTDataModule()
    data.setup()
    assert hparams["preprocessing"] == {
        "image_size": 28, "in_channels": 1, "mean": data.mean, "std": data.std, "class_names": ["NORMAL", "PNEUMONIA"],
        "geometry": "crop", "normalization": "train",
        "task": {"name": "pneumonia", "classes": ["NORMAL", "PNEUMONIA"], "folders": [], "file_name_words": {}, "unknown": "refuse"},
    }


def test_loaded_classifier_reproduces_the_runs_test_matrix(cnn_run: Path) -> None:
    metrics = json.loads((cnn_run / "metrics.json").read_text())
    module = load_classifier(cnn_run / "checkpoints" / "best.ckpt")
    prep = module.hparams.preprocessing
    data = PneumoniaMNISTDataModule()
    data.setup()
    test = data.splits["test"]
    called = module.predict_probabilities(normalize(test.images, prep["mean"], prep["std"])) > module.hparams.threshold
    positive = test.labels.bool()
    matrix = [[int((~called & ~positive).sum()), int((called & ~positive).sum())],
              [int((~called & positive).sum()), int((called & positive).sum())]]
    assert matrix == metrics["confusion_matrix"]["matrix"]


def _truncated(run: Path, path: Path) -> None:
    data = (run / "checkpoints" / "best.ckpt").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign_state_dict(run: Path, path: Path) -> None:
    torch.save({"weight": torch.zeros(3)}, path)


def _foreign_target(run: Path, path: Path) -> None:
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["net"]["_target_"] = "os.system"
    torch.save(checkpoint, path)


class RunsCode:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _code_in_pickle(run: Path, path: Path) -> None:
    torch.save({"state_dict": {}, "payload": RunsCode(path.with_suffix(".pwned"))}, path)


BAD_CHECKPOINTS = {
    "missing": (lambda run, path: None, "does not exist"),
    "folder": (lambda run, path: path.mkdir(), "is a folder"),
    "not a checkpoint": (lambda run, path: path.write_text("hello"), "is not a readable checkpoint"),
    "truncated": (_truncated, "is not a readable checkpoint"),
    "foreign state dict": (_foreign_state_dict, "not an xray_cls checkpoint"),
    "foreign network target": (_foreign_target, "not an xray_cls checkpoint that can be trusted"),
    "pickled code": (_code_in_pickle, "is not a plain checkpoint: it holds Python objects (getattr) that could run code"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_refused_with_their_path(case: str, cnn_run: Path, tmp_path: Path) -> None:
    make, expected = BAD_CHECKPOINTS[case]
    path = tmp_path / "model.ckpt"
    make(cnn_run, path)
    with pytest.raises(UserInputError) as caught:
        load_classifier(path)
    assert str(path) in str(caught.value) and expected in str(caught.value)
    assert "weights_only" not in str(caught.value)  # never the advice to load it the unsafe way
    assert not path.with_suffix(".pwned").exists()  # weights_only loading ran no pickled code


def test_pickled_code_would_run_without_weights_only(tmp_path: Path) -> None:
    """The check above is meaningful: the same file does run code when loaded the unsafe way."""
    path = tmp_path / "model.ckpt"
    _code_in_pickle(Path(), path)
    torch.load(path, weights_only=False)
    assert path.with_suffix(".pwned").exists()


def test_cli_reports_a_corrupt_checkpoint_in_one_line(cnn_run: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "best.ckpt"
    _truncated(cnn_run, ckpt)
    result = run_cli([f"ckpt={ckpt}", f"input={tmp_path}"], cwd=tmp_path, module="xray_cls.predict")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: ckpt={ckpt} is not a readable checkpoint")
    assert "Traceback" not in result.stderr


def test_record_threshold_leaves_no_temporary_file(cnn_run: Path) -> None:
    assert sorted(p.name for p in (cnn_run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


# Crafted checkpoints: a run's own best.ckpt with a payload that writes the file `marker` if
# anything in it is instantiated (as Hydra's recursive instantiate of the checkpoint once did).


def writes(marker: Path) -> dict:
    """A config that writes `marker` when Hydra instantiates it."""
    return {"_target_": "pathlib.Path.write_text", "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "pwned"]}


def _nested_in_an_argument(net: dict, marker: Path) -> None:
    net["dropout"] = writes(marker)


def _nested_in_a_list(net: dict, marker: Path) -> None:
    net["hidden"] = [writes(marker)]


def _hydra_positional_arguments(net: dict, marker: Path) -> None:
    net["_args_"] = [writes(marker)]


def _dotted_path_through_the_networks_module(net: dict, marker: Path) -> None:
    net.clear()  # passes a check of the prefix xray_cls.networks.
    net.update({"_target_": "xray_cls.networks.nn.modules.module.torch.save", "_args_": [[1], str(marker)]})


def _tensor_argument(net: dict, marker: Path) -> None:
    net["hidden"] = torch.tensor([8])


CRAFTED_NETWORKS = {
    "a _target_ nested in an argument": (_nested_in_an_argument, "net.dropout is a config to instantiate (pathlib.Path.write_text)"),
    "a _target_ nested in a list": (_nested_in_a_list, "net.hidden is a list holding a config to instantiate (pathlib.Path.write_text)"),
    "Hydra's _args_": (_hydra_positional_arguments, "net has the key '_args_', which is not a network argument"),
    "a dotted path through xray_cls.networks": (
        _dotted_path_through_the_networks_module, "net._target_='xray_cls.networks.nn.modules.module.torch.save' is not one of"
    ),
    "a tensor argument": (_tensor_argument, "net.hidden is a Tensor, not a number"),
}
CRAFTED_VALUES = {  # never instantiated, but the loader uses them: plain values only
    "threshold": ({"_target_": "builtins.float"}, "threshold is a config to instantiate (builtins.float), not a number"),
    "threshold above 1": (2**31, "threshold is 2147483648, not a number in [0, 1]"),  # found by the fuzzer: torchmetrics' traceback
    "pos_weight": ("heavy", "pos_weight is a str, not a number or None"),
    "temperature": ({"_target_": "builtins.float"}, "temperature is a config to instantiate (builtins.float), not a positive number"),
    "preprocessing": ({"image_size": [28, {"a": 1}]}, "preprocessing.image_size is a list holding a dict"),
}
WOULD_WRITE = [case for case in CRAFTED_NETWORKS if case != "a tensor argument"]


def craft(run: Path, path: Path, hparam: str, change) -> Path:
    """`path`: the run's best.ckpt with hyper_parameters[hparam] changed; returns the payload's marker."""
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    marker = path.parent / f"{path.stem}.pwned"
    if hparam == "net":
        change(checkpoint["hyper_parameters"]["net"], marker)
    else:
        checkpoint["hyper_parameters"][hparam] = writes(marker)
    torch.save(checkpoint, path)
    return marker


@pytest.mark.parametrize("case", WOULD_WRITE)
def test_the_crafted_networks_do_write_when_instantiated(case: str, cnn_run: Path, tmp_path: Path) -> None:
    """The tests below are meaningful: Hydra's instantiate of the same `net` writes the file."""
    marker = craft(cnn_run, tmp_path / "model.ckpt", "net", CRAFTED_NETWORKS[case][0])
    net = torch.load(tmp_path / "model.ckpt", weights_only=True)["hyper_parameters"]["net"]
    try:
        instantiate(net)
    except Exception:  # the payload has run by the time the network refuses what it returned
        pass
    assert marker.exists()


@pytest.mark.parametrize("hparam", ["optimizer", "scheduler"])
def test_a_crafted_optimizer_or_scheduler_does_write_when_instantiated(hparam: str, cnn_run: Path, tmp_path: Path) -> None:
    marker = craft(cnn_run, tmp_path / "model.ckpt", hparam, None)
    instantiate(torch.load(tmp_path / "model.ckpt", weights_only=True)["hyper_parameters"][hparam])
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("case", CRAFTED_NETWORKS)
def test_predict_and_evaluate_refuse_a_crafted_network(case: str, cnn_run: Path, kermany_root: Path, tmp_path: Path) -> None:
    change, expected = CRAFTED_NETWORKS[case]
    ckpt = tmp_path / "model.ckpt"
    marker = craft(cnn_run, ckpt, "net", change)
    out = tmp_path / "out"
    with pytest.raises(UserInputError) as refused:
        predict(compose_config(out, [f"ckpt={ckpt}", f"input={kermany_root / 'test'}"], name="predict"))
    assert str(refused.value).startswith(f"ckpt={ckpt} is not an xray_cls checkpoint that can be trusted: {expected}")
    with pytest.raises(UserInputError, match="can be trusted"):
        evaluate(compose_config(out, [f"ckpt={ckpt}"], name="evaluate"))
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("hparam", CRAFTED_VALUES)
def test_values_the_loader_uses_must_be_plain(hparam: str, cnn_run: Path, tmp_path: Path) -> None:
    value, expected = CRAFTED_VALUES[hparam]
    checkpoint = torch.load(cnn_run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"][hparam.split()[0]] = value
    torch.save(checkpoint, tmp_path / "model.ckpt")
    with pytest.raises(UserInputError, match=re.escape(f"can be trusted: {expected}")):
        load_classifier(tmp_path / "model.ckpt")


@pytest.mark.parametrize("hparam", ["optimizer", "scheduler"])
def test_predict_and_evaluate_never_build_a_checkpoints_optimizer_or_scheduler(
    hparam: str, cnn_run: Path, kermany_root: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "model.ckpt"
    marker = craft(cnn_run, ckpt, hparam, None)
    module = load_classifier(ckpt)
    assert module.hparams.optimizer is None and module.hparams.scheduler is None
    predict(compose_config(tmp_path / "predict", [f"ckpt={ckpt}", f"input={kermany_root / 'test'}"], name="predict"))
    metrics = evaluate(compose_config(tmp_path / "evaluate", [f"ckpt={ckpt}", "gradcam_samples=0", "bootstrap.resamples=10"],
                                      name="evaluate"))
    assert metrics["n_test"] == 624 and (tmp_path / "predict" / "predictions.csv").is_file()
    assert not marker.exists()


def test_cli_refuses_a_crafted_checkpoint_in_one_line(cnn_run: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    marker = craft(cnn_run, ckpt, "net", _nested_in_an_argument)
    for module, args in [("xray_cls.predict", [f"input={tmp_path}"]), ("xray_cls.evaluate", [])]:
        result = run_cli([f"ckpt={ckpt}", *args, f"hydra.run.dir={tmp_path / module}"], cwd=tmp_path, module=module)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.startswith(f"error: ckpt={ckpt} is not an xray_cls checkpoint that can be trusted: net.dropout")
        assert len(result.stderr.strip().splitlines()) == 1
        assert not marker.exists()
        assert not any((tmp_path / module).glob("*.csv")) and not (tmp_path / module / "metrics.json").exists()


def test_last_checkpoint_carries_the_runs_threshold(cnn_run: Path, kermany_root: Path, tmp_path: Path) -> None:
    metrics = json.loads((cnn_run / "metrics.json").read_text())
    last = cnn_run / "checkpoints" / "last.ckpt"
    hparams = read_checkpoint(last)["hyper_parameters"]
    assert hparams["threshold"] == metrics["threshold"] != 0.5
    assert hparams["threshold_rule"] == metrics["threshold_rule"]
    csv_path = predict(compose_config(tmp_path, [f"ckpt={last}", f"input={kermany_root / 'test'}"], name="predict"))
    rows = csv_path.read_text().splitlines()[1:]
    assert rows and all(row.split(",")[3] == f"{metrics['threshold']:.6f}" for row in rows)


# Checkpoints whose sizes lie: small files whose arguments would build networks or tensors out of
# all proportion to what they hold.


def _mlp_checkpoint(mlp_run: Path, path: Path, **net: object) -> Path:
    checkpoint = torch.load(mlp_run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["net"].update(net)
    torch.save(checkpoint, path)
    return path


def test_network_arguments_are_checked_against_the_state_dict_before_anything_is_built(mlp_run: Path, tmp_path: Path) -> None:
    """hidden=[1000000] in a 1 MB file once built a 3.9 GB network before the mismatch was found."""
    path = _mlp_checkpoint(mlp_run, tmp_path / "wide.ckpt", hidden=[1_000_000])
    built: list[int] = []
    original = torch.nn.Linear.__init__

    def counting(self: torch.nn.Linear, in_features: int, out_features: int, *args: object, **kwargs: object) -> None:
        if kwargs.get("device") is None and torch.get_default_device().type != "meta":
            built.append(in_features * out_features)
        original(self, in_features, out_features, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Linear, "__init__", counting)
        with pytest.raises(UserInputError) as refused:
            load_classifier(path)
    assert str(refused.value).startswith(
        f"ckpt={path} does not match the network it names (8 tensor(s) differ; net.head.0.bias: the arguments build [1000000], "
        "the file holds [256])"
    )
    assert built == []  # not a single real layer was allocated


def test_a_network_argument_listing_200000_layers_is_refused_unbuilt(mlp_run: Path, tmp_path: Path) -> None:
    path = _mlp_checkpoint(mlp_run, tmp_path / "deep.ckpt", hidden=[1] * 200_000)
    with pytest.raises(UserInputError, match=re.escape("net.hidden has 200,000 items; a network argument holds at most 64")):
        load_classifier(path)


def _with_image_size(mlp_run: Path, path: Path, image_size: object) -> Path:
    checkpoint = torch.load(mlp_run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["preprocessing"]["image_size"] = image_size
    torch.save(checkpoint, path)
    return path


def test_preprocessing_image_size_is_checked_by_every_command(mlp_run: Path, tmp_path: Path) -> None:
    """12000 once meant an 18.4 GB allocation in predict; -1 and 0 a ValueError and a ZeroDivisionError."""
    ckpt = _with_image_size(mlp_run, tmp_path / "model.ckpt", 12000)
    for module, args in [("xray_cls.predict", [f"input={tmp_path}"]), ("xray_cls.evaluate", []), ("xray_cls.export", [])]:
        result = run_cli([f"ckpt={ckpt}", *args, f"hydra.run.dir={tmp_path / module}"], cwd=tmp_path, module=module)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [
            f"error: ckpt={ckpt} is not an xray_cls checkpoint that can be trusted: preprocessing.image_size=12000 is not an "
            "integer from 1 to 2048; expected a .ckpt file written by an xray_cls run (outputs/<run>/checkpoints/best.ckpt or last.ckpt)"
        ]


@pytest.mark.parametrize("image_size", [-1, 0, 28.5, "28"])
def test_preprocessing_image_size_must_be_a_size(mlp_run: Path, tmp_path: Path, image_size: object) -> None:
    ckpt = _with_image_size(mlp_run, tmp_path / "model.ckpt", image_size)
    with pytest.raises(UserInputError, match=re.escape(f"can be trusted: preprocessing.image_size={image_size} is not an integer")):
        load_classifier(ckpt)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("std", 0.0, "preprocessing.std=0.0 is not a positive number"),
    ("mean", float("nan"), "preprocessing.mean=nan is not a finite number"),
    ("in_channels", 3000, "preprocessing.in_channels=3000 is not an integer from 1 to 4"),
    ("geometry", "squash", "preprocessing.geometry='squash' is not one of crop, stretch"),
])
def test_every_preprocessing_value_is_bounded(mlp_run: Path, tmp_path: Path, key: str, value: object, expected: str) -> None:
    checkpoint = torch.load(mlp_run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["preprocessing"][key] = value
    torch.save(checkpoint, tmp_path / "model.ckpt")
    with pytest.raises(UserInputError, match=re.escape(f"can be trusted: {expected}")):
        load_classifier(tmp_path / "model.ckpt")


def test_a_whole_number_threshold_is_taken(cnn_run: Path, tmp_path: Path) -> None:
    """Found by the fuzzer: threshold 0, an int, made torchmetrics refuse the classifier with a traceback."""
    checkpoint = torch.load(cnn_run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["threshold"] = 0
    torch.save(checkpoint, tmp_path / "model.ckpt")
    module = load_classifier(tmp_path / "model.ckpt")
    assert module.threshold == 0.0 and module.decisions(torch.tensor([0.001, 0.9])).tolist() == [1, 1]


def test_a_flipped_byte_in_a_weight_is_refused_by_its_checksum(cnn_run: Path, tmp_path: Path) -> None:
    """Found by the fuzzer: torch's reader never checks the zip's CRC-32s, so a damaged weight loaded
    as another number (or NaN) and predict wrote probabilities of nan."""
    import zipfile

    source = cnn_run / "checkpoints" / "best.ckpt"
    with zipfile.ZipFile(source) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)  # a weight tensor's bytes, stored
        offset = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra) + 100
    data = bytearray(source.read_bytes())
    data[offset] ^= 0xFF
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match=rf"ckpt={re.escape(str(damaged))} is damaged: .*{re.escape(entry.filename)} does not match its checksum"):
        load_classifier(damaged)


def test_weights_that_are_not_finite_are_refused(cnn_run: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(cnn_run / "checkpoints" / "best.ckpt", weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.startswith("net."))
    checkpoint["state_dict"][key].view(-1)[0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    with pytest.raises(UserInputError, match=rf"holds weights that are not finite numbers \(NaN or infinity in {re.escape(key)}\)"):
        load_classifier(tmp_path / "nan.ckpt")
