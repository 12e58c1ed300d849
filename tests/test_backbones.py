"""torchvision and timm networks: pretrained weights from a local file or the library's cache (never
the network), one input channel, the task's head, fine-tuning, and checkpoints as safe as the
study's networks."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import Callback

from xray_cls.core.checkpoint_files import write_checkpoint
from xray_cls.core.errors import UserInputError
from xray_cls.evaluate import evaluate
from xray_cls.models.backbones import TorchvisionNet
from xray_cls.models.checkpoints import load_classifier, read_checkpoint
from xray_cls.models.pretrained import IMAGENET_GRAY, Pretraining, load_weights
from xray_cls.predict import predict
from xray_cls.train import train

from conftest import SHORT_RUN, compose_config


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled PneumoniaMNIST cut to 300 / 60 / 120 images: these networks are large for this CPU."""
    from xray_cls.data import BUNDLED_NPZ

    arrays = np.load(BUNDLED_NPZ)
    path = tmp_path_factory.getbasetemp() / "small_pneumoniamnist.npz"
    if not path.exists():
        cut = {f"{split}_{part}": arrays[f"{split}_{part}"][:n] for split, n in (("train", 300), ("val", 60), ("test", 120))
               for part in ("images", "labels")}
        np.savez(path, **cut)
    return path


SMALL = [*SHORT_RUN, "data.image_size=32", "gradcam_samples=2"]


@pytest.fixture()
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torchvision cache; torch.hub reads TORCH_HOME at every call."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def cached_weights(torch_home: Path, name: str) -> dict[str, torch.Tensor]:
    """A state dict of torchvision's `name` (seeded, not ImageNet's) saved where its DEFAULT weights' file is cached."""
    torch.manual_seed(0)
    state = torchvision.models.get_model(name).state_dict()
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    target = torch_home / "hub" / "checkpoints" / Path(url).name
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return state


def features(model: torch.nn.Module, head: str) -> torch.nn.Module:
    """`model` without its head: what the head would see."""
    cut = copy.deepcopy(model).eval()
    cut.set_submodule(head, torch.nn.Identity())
    return cut


def test_summed_first_conv_sees_a_gray_image_as_the_rgb_network_sees_it_in_three_channels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18().eval()
    torch.save(rgb.state_dict(), tmp_path / "r18.pth")
    net = TorchvisionNet(1, 32, "resnet18")
    load_weights(net, Pretraining(weights=str(tmp_path / "r18.pth")))
    constant = torch.full((2, 1, 32, 32), 0.7)
    noisy = torch.rand(2, 1, 32, 32)
    for gray in (constant, noisy):
        ours = features(net.model, "fc")(gray)
        theirs = features(rgb, "fc")(gray.repeat(1, 3, 1, 1))
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert net.model.conv1.weight.shape[1] == 1 and torch.allclose(net.model.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert net.model.fc.out_features == 1  # the task's head: one logit for two classes


def test_default_weights_load_from_torchvisions_cache_with_its_own_code(torch_home: Path) -> None:
    state = cached_weights(torch_home, "resnet18")
    net = TorchvisionNet(1, 32, "resnet18")
    load_weights(net, Pretraining(weights="DEFAULT", download=False))  # no download even tried
    assert torch.equal(net.model.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    assert torch.allclose(net.model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_densenet121_trains_from_its_cached_default_weights_without_a_network(torch_home: Path, tmp_path: Path, small_data: Path) -> None:
    state = cached_weights(torch_home, "densenet121")
    metrics = train(compose_config(tmp_path / "run", [*SMALL, f"data.path={small_data}", "model=densenet121", "model.weights=DEFAULT", "model.download=false",
                                                      "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]))
    ckpt = read_checkpoint(tmp_path / "run" / metrics["best_checkpoint"]["path"])
    prep = ckpt["hyper_parameters"]["preprocessing"]
    assert (prep["normalization"], prep["mean"], prep["std"]) == ("imagenet", *IMAGENET_GRAY)
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == metrics["n_test"] == 120
    assert metrics["hparams"]["model"] == "densenet121"
    first = ckpt["state_dict"]["net.model.features.conv0.weight"]
    assert first.shape[1] == 1 and not torch.equal(first, torch.zeros_like(first))
    assert state["features.conv0.weight"].shape[1] == 3


def test_missing_weights_with_no_network_are_one_line(torch_home: Path, tmp_path: Path, small_data: Path) -> None:
    with pytest.raises(UserInputError) as refused:
        train(compose_config(tmp_path / "run", [*SMALL, f"data.path={small_data}", "model=resnet18", "model.weights=DEFAULT", "model.download=false"]))
    message = str(refused.value)
    assert "\n" not in message and "resnet18-f37072fd.pth is not in the cache" in message
    assert str(torch_home / "hub" / "checkpoints") in message and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["model=resnet18", "model.weights=IMAGENET9"], "model.weights=IMAGENET9 is not a weights name of resnet18; expected one of IMAGENET1K_V1"),
    (["model=cnn", "model.weights=DEFAULT"], "the CNN has no pretrained weights of that name; expected the backbone.pth"),
    (["model=torchvision", "model.name=resnet18x"], "model.name='resnet18x' is not a classification model of torchvision"),
    (["model=torchvision", "model.name=fasterrcnn_resnet50_fpn"], "is not a classification model of torchvision"),
    (["model=resnet18", "model.freeze_epochs=-1"], "model.freeze_epochs=-1 is not valid"),
    (["model=resnet18", "model.freeze_epochs=1", "trainer=ddp"], "DDP waits for the frozen parameters' gradients"),
    (["model=resnet18", "model.backbone_lr_scale=2"], r"model.backbone_lr_scale=2 is not valid; expected a number in \[0, 1\]"),
])
def test_bad_backbone_options_are_one_line(tmp_path: Path, small_data: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        train(compose_config(tmp_path / "run", [*SMALL, f"data.path={small_data}", *overrides]))


def test_a_local_file_of_another_network_is_refused(tmp_path: Path, small_data: Path) -> None:
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserInputError, match=r"r34.pth does not hold this network's weights: it has the extra tensor layer1.2"):
        train(compose_config(tmp_path / "run", [*SMALL, f"data.path={small_data}", "model=resnet18", f"model.weights={tmp_path / 'r34.pth'}"]))


class WatchParameters(Callback):
    """Copies of the backbone and head at the start and after each epoch, and the optimizer's rates."""

    seen: dict[str, list] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        WatchParameters.seen = {"states": [self.snapshot(pl_module)], "lrs": [g["lr"] for g in trainer.optimizers[0].param_groups]}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        WatchParameters.seen["states"].append(self.snapshot(pl_module))

    @staticmethod
    def snapshot(pl_module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.net.model.state_dict().items()}


def test_freeze_epochs_keeps_the_backbone_until_it_thaws(tmp_path: Path, small_data: Path) -> None:
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    train(compose_config(tmp_path / "run", [
        *SMALL, f"data.path={small_data}", "model=resnet18", f"model.weights={tmp_path / 'r18.pth'}", "model.freeze_epochs=1", "model.backbone_lr_scale=0.1",
        "optimizer.lr=0.01", "+callbacks.watch._target_=test_backbones.WatchParameters",
    ]))
    start, frozen, thawed = WatchParameters.seen["states"]
    backbone = [k for k in start if not k.startswith("fc.")]
    assert all(torch.equal(start[k], frozen[k]) for k in backbone)  # weights and batch-norm statistics alike
    assert not torch.equal(start["fc.weight"], frozen["fc.weight"])  # the head trained meanwhile
    assert not torch.equal(frozen["layer4.1.conv2.weight"], thawed["layer4.1.conv2.weight"])
    assert not torch.equal(frozen["bn1.running_mean"], thawed["bn1.running_mean"])
    assert WatchParameters.seen["lrs"] == pytest.approx([0.01, 0.001])  # the head's rate, the backbone's


NETWORKS = {
    "torchvision": ["model=resnet18"],
    "timm": ["model=timm", "model.name=test_resnet"],
}


@pytest.fixture(scope="module", params=list(NETWORKS))
def library_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> tuple[str, Path, dict, Path]:
    """(library, run folder, metrics, weights file) of a run started from a local weights file."""
    library = request.param
    if library == "timm":
        timm = pytest.importorskip("timm", reason="model=timm needs the optional timm package")
        source = timm.create_model("test_resnet", pretrained=False)
    else:
        source = torchvision.models.resnet18()
    folder = tmp_path_factory.mktemp(f"{library}_run")
    torch.save(source.state_dict(), folder / "weights.pth")
    metrics = train(compose_config(folder / "run", [*SMALL, f"data.path={small_data}", *NETWORKS[library], f"model.weights={folder / 'weights.pth'}"]))
    return library, folder / "run", metrics, folder / "weights.pth"


def test_a_library_network_predicts_evaluates_and_exports_from_its_checkpoint(library_run, tmp_path: Path, small_data: Path) -> None:
    import onnxruntime

    from xray_cls.data import BUNDLED_NPZ, normalize
    from xray_cls.data.images import resize_uint8
    from xray_cls.export import export

    library, run, metrics, weights = library_run
    weights.unlink()  # a checkpoint never reads its network's pretrained weights again
    ckpt = run / "checkpoints" / "best.ckpt"
    evaluated = evaluate(compose_config(tmp_path / "ev", [f"ckpt={ckpt}", f"data.path={small_data}"], name="evaluate"))
    assert evaluated["confusion_matrix"] == metrics["confusion_matrix"]
    images = tmp_path / "images"
    images.mkdir()
    arrays = np.load(BUNDLED_NPZ)
    from PIL import Image

    for i in range(3):
        Image.fromarray(arrays["test_images"][i]).save(images / f"{i}.png")
    csv_path = predict(compose_config(tmp_path / "pr", [f"ckpt={ckpt}", f"input={images}"], name="predict"))
    with open(csv_path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    model_path = export(compose_config(tmp_path / "ex", [f"ckpt={ckpt}"], name="export"))
    module = load_classifier(ckpt)
    prep = module.hparams.preprocessing
    batch = resize_uint8(torch.from_numpy(arrays["test_images"][:4]).unsqueeze(1), prep["image_size"], "crop")
    expected = module.predict_probabilities(normalize(batch, prep["mean"], prep["std"])).numpy()
    (got,) = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"images": batch.numpy()})
    assert np.allclose(got, expected, atol=1e-4)
    assert json.loads((model_path.parent / "model.json").read_text())["normalization"]["mean"] == pytest.approx(IMAGENET_GRAY[0])


def test_a_library_network_resumes_from_its_checkpoint(library_run, tmp_path: Path, small_data: Path) -> None:
    library, finished, metrics, _ = library_run
    run = tmp_path / "interrupted"  # the run as a kill after its first epoch leaves it
    shutil.copytree(finished, run)
    (run / "metrics.json").unlink()
    last = run / "checkpoints" / "last.ckpt"
    resumed = train(compose_config(tmp_path / "resumed", [*SMALL, f"data.path={small_data}", *NETWORKS[library], "model.weights=/nowhere/weights.pth",
                                                          f"ckpt_path={last}", "trainer.max_epochs=3"]))
    assert resumed["epochs"] == 3 and resumed["resumed_from"] == str(last) and (run / "metrics.json").is_file()


@pytest.mark.parametrize("library_run", ["torchvision"], indirect=True)
@pytest.mark.parametrize(("change", "message"), [
    (lambda net: net.update(name="resnet18x"), "names a network that cannot be built .*model.name='resnet18x' is not a classification model"),
    (lambda net: net.update(name="get_model"), "model.name='get_model' is not a classification model of torchvision"),
    (lambda net: net.update(name={"_target_": "os.system", "command": "touch /tmp/x"}), r"net.name is a config to instantiate \(os.system\)"),
    (lambda net: net.update(weights="/etc/passwd"), "names a network that cannot be built .*unexpected keyword argument 'weights'"),
    (lambda net: net.update(_target_="torchvision.models.resnet18"), "net._target_='torchvision.models.resnet18' is not one of"),
    (lambda net: net.update(name="resnet34"), "does not match the network it names"),
])
def test_a_crafted_library_checkpoint_is_refused(library_run, tmp_path: Path, change, message: str) -> None:
    _, run, _, _ = library_run
    checkpoint = read_checkpoint(run / "checkpoints" / "best.ckpt")
    change(checkpoint["hyper_parameters"]["net"])
    write_checkpoint(tmp_path / "crafted.ckpt", checkpoint)
    with pytest.raises(UserInputError, match=message):
        load_classifier(tmp_path / "crafted.ckpt")


def test_a_convolution_head_gives_logits_of_either_sign() -> None:
    """squeezenet's classifier ends in a ReLU after its 1x1 convolution: kept, no image could be called NORMAL."""
    torch.manual_seed(0)
    net = TorchvisionNet(1, 64, "squeezenet1_1").eval()
    logits = net(torch.randn(16, 1, 64, 64))
    assert logits.shape == (16,) and (logits < 0).any()
