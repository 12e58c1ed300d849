"""`python -m xray_cls.pretrain`: a backbone from unlabeled images that a classifier starts from.

Small synthetic sets in the layouts of the real ones (an .npz, a Kermany folder, a label table),
a small CNN, a few epochs: the real Lightning Trainer, lightly's losses and the real files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xray_cls.core.errors import UserInputError
from xray_cls.models.backbone_files import read_backbone_file
from xray_cls.models.networks import build_network
from xray_cls.models.pretrained import Pretraining, load_weights, pretrained_backbone
from xray_cls.pretrain import pretrain, read_images

from conftest import compose_config, make_kermany_folder, run_cli

SMALL_CNN = ["model=cnn", "model.channels=[8,16]", "model.hidden=[32]", "model.dropout=0"]
QUICK = ["trainer.enable_progress_bar=false", "pretrain.batch_size=32", "ssl.hidden_dim=64", "ssl.projection_dim=32"]


def stripes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28 px images of two kinds (horizontal or vertical stripes, at random phase, with noise) and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    grid = np.arange(28)
    images = np.empty((count, 28, 28), np.uint8)
    for i, label in enumerate(labels):
        wave = 127 + 100 * np.sin(grid / 2 + rng.uniform(0, 6.3))
        pattern = np.tile(wave[:, None] if label else wave[None, :], (1, 28) if label else (28, 1))
        images[i] = np.clip(pattern + rng.normal(0, 20, (28, 28)), 0, 255)
    return images, labels


@pytest.fixture(scope="module")
def stripes_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("npz") / "stripes.npz"
    arrays = {}
    for split, count, seed in (("train", 192, 1), ("val", 64, 2), ("test", 48, 3)):
        images, labels = stripes(count, seed)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez_compressed(path, **arrays)
    return path


def run(out: Path, overrides: list[str]) -> dict:
    return pretrain(compose_config(out, [*SMALL_CNN, *QUICK, *overrides], name="pretrain"))


@pytest.fixture(scope="module")
def pretrained(stripes_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrained")
    run(out, [f"data.path={stripes_npz}", "trainer.max_epochs=6", "callbacks.model_checkpoint.save_top_k=-1",
              "+callbacks.model_checkpoint.filename='{epoch}'"])
    return out


def test_the_loss_falls_and_tensorboard_shows_loss_lr_and_knn(pretrained: Path) -> None:
    curves = [line.split(",") for line in (pretrained / "curves.csv").read_text().splitlines()]
    column = curves[0].index("loss/pretrain_epoch")
    losses = [float(row[column]) for row in curves[1:] if row[column]]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses
    events = EventAccumulator(str(next((pretrained / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/pretrain_epoch", "knn_acc/val"} <= tags and any(t.startswith("lr-") for t in tags), tags
    metrics = json.loads((pretrained / "metrics.json").read_text())
    knn = [s.value for s in events.Scalars("knn_acc/val")]
    assert len(knn) == 6 and all(0 <= k <= 1 for k in knn) and metrics["last_epoch"]["knn_acc/val"] == pytest.approx(knn[-1])
    assert knn[-1] > 0.8, knn  # stripes are told apart by their neighbours in feature space, labels unlearned


def test_the_backbone_file_records_its_provenance(pretrained: Path, stripes_npz: Path) -> None:
    metrics = json.loads((pretrained / "metrics.json").read_text())
    record = metrics["pretraining"]
    assert record["images"] == 192 + 64 and record["method"] == "SimCLR" and record["epochs"] == 6
    assert record["include_test"] is False and len(record["files_sha256"]) == 64
    found = read_backbone_file(pretrained / "backbone.pth", "model.weights")
    assert found is not None and found.provenance == record
    assert found.image_size == 28 and found.network["_target_"].endswith(".CNN") and 0 < found.std


def fine_tuned_net(weights: Path | None, seed: int = 0) -> torch.nn.Module:
    net_cfg = {"_target_": "xray_cls.models.networks.CNN", "channels": [8, 16], "hidden": [32], "dropout": 0.0,
               "in_channels": 1, "image_size": 28}
    torch.manual_seed(seed)
    net = build_network(net_cfg)
    pretraining = Pretraining(weights=str(weights) if weights else None)
    load_weights(net, pretraining, pretrained_backbone(pretraining, net_cfg, 28, 1))
    return net


def test_the_weights_load_and_change_the_fine_tuned_networks_outputs(pretrained: Path) -> None:
    scratch, started = fine_tuned_net(None), fine_tuned_net(pretrained / "backbone.pth")
    found = read_backbone_file(pretrained / "backbone.pth", "model.weights")
    own = started.state_dict()
    assert all(torch.equal(own[k], v) for k, v in found.state.items())
    assert set(own) - set(found.state) == {"head.2.weight", "head.2.bias"}  # the output layer stays new ...
    assert torch.equal(own["head.2.weight"], scratch.state_dict()["head.2.weight"])  # ... as the seed made it
    images = torch.randn(8, 1, 28, 28)
    assert not torch.allclose(scratch(images), started(images))


def test_a_run_fine_tunes_from_it_normalized_as_it_was_pretrained(pretrained: Path, stripes_npz: Path, tmp_path: Path) -> None:
    from xray_cls.train import train

    found = read_backbone_file(pretrained / "backbone.pth", "model.weights")
    cfg = compose_config(tmp_path, [*SMALL_CNN, f"model.weights={pretrained / 'backbone.pth'}", "model.freeze_epochs=1",
                                    f"data.path={stripes_npz}", "debug=fast", "trainer.enable_progress_bar=false"])
    metrics = train(cfg)
    checkpoint = torch.load(tmp_path / metrics["best_checkpoint"]["path"], weights_only=True)
    prep = checkpoint["hyper_parameters"]["preprocessing"]
    assert prep["normalization"] == "pretraining" and prep["mean"] == pytest.approx(found.mean)
    frozen = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.features.")}
    assert frozen and all(torch.equal(v, found.state[k]) for k, v in frozen.items())  # one frozen epoch: the backbone as pretrained
    assert sum(metrics["confusion_matrix"]["matrix"][0]) + sum(metrics["confusion_matrix"]["matrix"][1]) == 48


def test_an_interrupted_pretraining_resumes_to_the_same_backbone(pretrained: Path, tmp_path: Path, stripes_npz: Path) -> None:
    """The run stopped after its third epoch (its epoch=2.ckpt as last.ckpt) and resumed ends where the whole run ended."""
    folder = tmp_path / "run"
    shutil.copytree(pretrained, folder)
    for name in ("metrics.json", "backbone.pth"):
        (folder / name).unlink()
    (folder / "checkpoints" / "epoch=2.ckpt").replace(folder / "checkpoints" / "last.ckpt")
    run(tmp_path / "resuming", [f"data.path={stripes_npz}", "trainer.max_epochs=6", "callbacks.model_checkpoint.save_top_k=-1",
                                "+callbacks.model_checkpoint.filename='{epoch}'", f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"])
    whole = read_backbone_file(pretrained / "backbone.pth", "model.weights")
    resumed = read_backbone_file(folder / "backbone.pth", "model.weights")
    assert resumed.provenance["epochs"] == 6
    assert all(torch.equal(resumed.state[k], v) for k, v in whole.state.items())


def write_table_dataset(root: Path, labels: list[int]) -> None:
    """root/images/*.png and root/labels.csv (path, label, official split), as a label table ships."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, _ = stripes(len(labels), 7)
    rows = ["file,finding,patient,split"]
    for i, label in enumerate(labels):
        Image.fromarray(images[i]).save(root / "images" / f"scan_{i:03d}.png")
        rows.append(f"scan_{i:03d}.png,{label},p{i // 2},{'test' if i >= len(labels) - 16 else 'train'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


TABLE = ["data=table", "data.image_root=images", "data.path_column=file", "data.label_column=finding", "data.label_values={NORMAL:['0'],PNEUMONIA:['1']}",
         "data.patient_column=patient", "data.split_column=split", "data.split_values={train:[train],test:[test]}",
         "data.image_size=28", "data.min_val_images=1", "data.val_fraction=0.2", "data.cache_dir=null"]


def test_a_table_with_shuffled_labels_pretrains_to_exactly_the_same_weights(tmp_path: Path) -> None:
    labels = [i % 2 for i in range(96)]
    shuffled = list(np.random.default_rng(0).permutation(labels))
    backbones, root = [], tmp_path / "dataset"
    for name, table_labels in (("labels", labels), ("shuffled", shuffled)):
        write_table_dataset(root, table_labels)  # the same images, the table's labels shuffled
        metrics = run(tmp_path / f"out_{name}", [*TABLE, f"data.root={root}", "trainer.max_epochs=2", "pretrain.knn_k=0"])
        assert metrics["pretraining"]["images"] == 80  # every image but the official test split's 16
        backbones.append(read_backbone_file(tmp_path / f"out_{name}" / "backbone.pth", "model.weights"))
    assert backbones[0].provenance["files_sha256"] == backbones[1].provenance["files_sha256"]
    assert all(torch.equal(backbones[1].state[k], v) for k, v in backbones[0].state.items())


def test_test_images_are_left_out_unless_asked_for(tmp_path: Path, stripes_npz: Path) -> None:
    root = make_kermany_folder(tmp_path / "chest_xray")  # train 50, test 20
    extra = tmp_path / "archive"
    make_kermany_folder(extra)  # an unlabeled archive with its own test/ folder
    base = [*SMALL_CNN, *QUICK, "data=folder", f"data.root={root}", "data.image_size=28", "data.cache_dir=null",
            f"pretrain.sources=[{extra},{stripes_npz}]"]
    honest, _ = read_images(compose_config(tmp_path, base, name="pretrain"))
    everything, _ = read_images(compose_config(tmp_path, [*base, "pretrain.include_test=true"], name="pretrain"))
    assert list(honest.counts.values()) == [50, 50, 192 + 64]  # the folder's train/ (its val drawn from it), the archive's, the .npz's
    assert list(everything.counts.values()) == [70, 70, 192 + 64 + 48]
    assert not any(f"{root}/test/".lower() in n.lower() or f"{extra}/test/".lower() in n.lower() or ": test/" in n.lower()
                   or ": test_images[" in n for n in honest.names)
    assert sum(": test_images[" in n for n in everything.names) == 48
    assert len(honest.names) == len(set(honest.names)) == len(honest.images)


@pytest.mark.parametrize(("overrides", "message"), [
    (["pretrain.batch_size=1"], "pretrain.batch_size=1 is not valid; expected an integer >= 2"),
    (["views.blur_sigma=[2,1]"], "views.blur_sigma=[2, 1] is not valid; expected [low, high]"),
    (["pretrain.sources=[/no/such/folder]"], "pretrain.sources: /no/such/folder does not exist; expected folders"),
    (["ssl.temperature=0"], "ssl.temperature=0 is not valid"),
])
def test_a_bad_option_is_one_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    done = run_cli(["debug=fast", *overrides, f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, module="xray_cls.pretrain")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and message in done.stderr, done.stderr


def crafted(tmp_path: Path, pretrained: Path, change: str) -> Path:
    record = torch.load(pretrained / "backbone.pth", weights_only=True)
    if change == "nan":
        key = next(iter(record["state_dict"]))
        record["state_dict"][key] = torch.full_like(record["state_dict"][key], float("nan"))
    elif change == "huge":
        record["network"]["hidden"] = [1_000_000]
    elif change == "format":
        record["format"] = "xray_cls.backbone/99"
    elif change == "target":
        record["network"]["_target_"] = "os.system"
    path = tmp_path / f"{change}.pth"
    torch.save(record, path)
    return path


class Marker:
    """An object whose unpickling would write a file: a file that runs code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize(("change", "message"), [
    ("nan", "not finite numbers"),
    ("huge", "does not match the network it names"),
    ("format", "is not a backbone file of this xray_cls"),
    ("target", "net._target_='os.system' is not one of"),
    ("pickle", "holds Python objects"),
])
def test_a_crafted_backbone_file_is_refused_in_one_line(tmp_path: Path, pretrained: Path, stripes_npz: Path, change: str,
                                                        message: str) -> None:
    marker = tmp_path / "ran"
    if change == "pickle":
        path = tmp_path / "evil.pth"
        record = torch.load(pretrained / "backbone.pth", weights_only=True)
        torch.save({**record, "provenance": {"note": Marker(str(marker))}}, path)
    else:
        path = crafted(tmp_path, pretrained, change)
    done = run_cli([*SMALL_CNN, f"model.weights={path}", f"data.path={stripes_npz}", "debug=fast", f"hydra.run.dir={tmp_path / 'out'}"],
                   cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr and message in done.stderr, done.stderr[-1500:]
    assert not marker.exists()


def test_a_pretraining_checkpoint_is_refused_where_a_classifier_is_expected_and_crafted_ones_on_resume(
        tmp_path: Path, pretrained: Path) -> None:
    last = pretrained / "checkpoints" / "last.ckpt"
    done = run_cli([f"ckpt={last}", f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path, module="xray_cls.evaluate")
    assert done.returncode == 2 and "is a checkpoint of a pretraining" in done.stderr and "model.weights=" in done.stderr
    folder = tmp_path / "run"
    shutil.copytree(pretrained, folder, ignore=shutil.ignore_patterns("metrics.json", "backbone.pth"))
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["net"]["hidden"] = [1_000_000]
    torch.save(checkpoint, folder / "checkpoints" / "last.ckpt")
    done = run_cli([*SMALL_CNN, f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"], cwd=tmp_path, module="xray_cls.pretrain")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "does not match the network it names" in done.stderr


def test_a_backbone_for_another_network_or_size_is_refused_in_one_line(tmp_path: Path, pretrained: Path, stripes_npz: Path) -> None:
    for overrides, message in ((["model=resnet"], "was pretrained for CNN at 28 px, not for this run's ResNet at 28 px"),
                               ([*SMALL_CNN, "data.image_size=32"], "data.image_size=28 there, 32 here"),
                               (["model=cnn"], "model.channels=[8, 16] there, [32, 64] here")):
        done = run_cli([*overrides, f"model.weights={pretrained / 'backbone.pth'}", f"data.path={stripes_npz}", "debug=fast",
                        f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-1500:]


@pytest.mark.parametrize("network", [
    {"_target_": "xray_cls.models.networks.MLP", "hidden": [16]},
    {"_target_": "xray_cls.models.networks.ResNet", "widths": [8, 16]},
    {"_target_": "xray_cls.models.networks.ReportCNN", "head": "softmax2"},
    {"_target_": "xray_cls.models.backbones.TorchvisionNet", "name": "resnet18"},
    {"_target_": "xray_cls.models.backbones.TorchvisionNet", "name": "squeezenet1_0"},
    {"_target_": "xray_cls.models.backbones.TimmNet", "name": "resnet18"},
])
def test_every_kind_of_network_pretrains_a_backbone_that_loads_back(network: dict, tmp_path: Path) -> None:
    """Features (the network without its output layer) for each kind of network, written and read back as a backbone file."""
    from xray_cls.core.checkpoint_files import write_checkpoint
    from xray_cls.models.backbone_files import backbone_record, load_backbone
    from xray_cls.models.features import Features, output_keys

    pytest.importorskip("timm") if network["_target_"].endswith("TimmNet") else None
    net_cfg = {**network, "in_channels": 1, "image_size": 64}
    torch.manual_seed(0)
    features = Features(build_network(net_cfg))
    out = features(torch.randn(3, 1, 64, 64))
    assert out.shape == (3, features.width)
    prep = {"image_size": 64, "in_channels": 1, "mean": 0.5, "std": 0.25, "geometry": "crop"}
    write_checkpoint(tmp_path / "backbone.pth", backbone_record(network, prep, {"method": "test"}, features.backbone_state()))
    found = read_backbone_file(tmp_path / "backbone.pth", "model.weights")
    torch.manual_seed(1)
    fresh = build_network(net_cfg)
    head_before = {k: fresh.state_dict()[k].clone() for k in output_keys(fresh)}
    load_backbone(fresh, found)
    assert head_before and all(torch.equal(fresh.state_dict()[k], v) for k, v in head_before.items())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in found.state.items())


def test_a_pretraining_runs_under_ddp(tmp_path: Path, stripes_npz: Path) -> None:
    """Two CPU processes (gloo): NT-Xent gathers both processes' views, the kNN monitor both processes' features."""
    out = tmp_path / "ddp"
    done = run_cli([*SMALL_CNN, *QUICK, f"data.path={stripes_npz}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                    "trainer.max_epochs=2", f"hydra.run.dir={out}"], cwd=tmp_path, module="xray_cls.pretrain", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pretraining"]["epochs"] == 2 and 0 <= metrics["last_epoch"]["knn_acc/val"] <= 1
    assert read_backbone_file(out / "backbone.pth", "model.weights") is not None


def test_byol_pretrains_and_resumes_to_the_same_backbone(tmp_path: Path, stripes_npz: Path) -> None:
    """BYOL's momentum copies are checkpointed as they follow the online network: a resumed run ends where the whole run ended."""
    every_epoch = [f"data.path={stripes_npz}", "ssl=byol", "trainer.max_epochs=3", "callbacks.model_checkpoint.save_top_k=-1",
                   "+callbacks.model_checkpoint.filename='{epoch}'"]
    run(tmp_path / "whole", every_epoch)
    folder = tmp_path / "stopped"
    shutil.copytree(tmp_path / "whole", folder, ignore=shutil.ignore_patterns("metrics.json", "backbone.pth"))
    (folder / "checkpoints" / "epoch=0.ckpt").replace(folder / "checkpoints" / "last.ckpt")
    run(tmp_path / "resuming", [*every_epoch, f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"])
    whole, resumed = (read_backbone_file(f / "backbone.pth", "model.weights") for f in (tmp_path / "whole", folder))
    assert whole.provenance["method"] == "BYOL" and all(torch.equal(resumed.state[k], v) for k, v in whole.state.items())
    state = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    online, momentum = state["method.backbone.net.features.0.weight"], state["method.backbone_momentum.net.features.0.weight"]
    assert not torch.equal(online, momentum)  # the copy lags the online network, as BYOL's target does


def test_a_pretraining_resumes_only_with_its_own_network(tmp_path: Path, pretrained: Path, stripes_npz: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(pretrained, folder, ignore=shutil.ignore_patterns("metrics.json", "backbone.pth"))
    overrides = [f"data.path={stripes_npz}", "trainer.max_epochs=6", f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"]
    with pytest.raises(UserInputError, match=r"is a pretraining of another network or image size \(model.hidden=\[32\] there, \[64\] here\)"):
        pretrain(compose_config(tmp_path / "out", [*SMALL_CNN, *QUICK, "model.hidden=[64]", *overrides], name="pretrain"))
