"""A model at another site: AdaBN and per-site normalization (adapt), recalibration on a few labeled
images (recalibrate), and evaluate's site protocol, on data whose shift is made here.

The site is the test images of a trained run seen through another scanner: the same pictures with
another contrast, gamma and offset. The class is in the brightness, so the shift breaks the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xray_cls.core.errors import UserInputError
from xray_cls.evaluation.site import adapt_batch_norm, batch_norm_layers, files_digest
from xray_cls.models.checkpoints import load_classifier, read_checkpoint

from conftest import compose_config

RNG = np.random.default_rng(0)


def pictures(count: int, label: int) -> np.ndarray:
    """28 px images whose class shows in their brightness, with some structure."""
    base = 95 + 60 * label
    images = RNG.normal(base, 22, (count, 28, 28))
    images[:, 8:20, 6:12] += 25  # a "lung" either class has
    return np.clip(images, 0, 255).astype(np.uint8)


def shifted(images: np.ndarray) -> np.ndarray:
    """Another scanner: lower contrast, a gamma and a darker offset."""
    x = images.astype(np.float64) / 255
    return np.clip(255 * (0.6 * x**1.3) + 10, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("site")
    arrays = {}
    for split, (normal, pneumonia) in {"train": (300, 300), "val": (60, 60), "test": (80, 80)}.items():
        images = np.concatenate([pictures(normal, 0), pictures(pneumonia, 1)])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, np.repeat([0, 1], [normal, pneumonia])[:, None]
    np.savez(folder / "source.npz", **arrays)
    site = folder / "site_images"
    for i, (image, label) in enumerate(zip(shifted(arrays["test_images"]), arrays["test_labels"][:, 0])):
        (site / ("NORMAL", "PNEUMONIA")[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(site / ("NORMAL", "PNEUMONIA")[label] / f"patient{i:03d}_scan.png")
    return {"npz": folder / "source.npz", "site": site, "folder": folder}


@pytest.fixture(scope="module")
def resnet_run(site_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xray_cls.train import train

    run_dir = tmp_path_factory.mktemp("resnet_run")
    train(compose_config(run_dir, ["model=resnet", f"data.path={site_data['npz']}", "trainer.max_epochs=3", "threshold_rule=youden",
                                   "calibration=temperature", "bootstrap.resamples=0", "gradcam_samples=0"]))
    return run_dir


def evaluate_site(run: Path, data: Path, out: Path, *site: str) -> dict:
    from xray_cls.evaluate import evaluate

    return evaluate(compose_config(out, [f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "data=folder", f"data.root={data}",
                                         "bootstrap.resamples=0", "gradcam_samples=0", *site], name="evaluate"))


def feature_statistics(net: torch.nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The mean and variance, per channel, of what reaches each batch-norm layer (eval mode)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, x: seen.append((x[0].mean((0, 2, 3)), x[0].var((0, 2, 3)))))
             for layer in batch_norm_layers(net)]
    with torch.no_grad():
        net.eval()(images)
    for hook in hooks:
        hook.remove()
    return seen


def test_adabn_restores_the_batch_norm_statistics_and_the_accuracy(resnet_run: Path, site_data: dict[str, Path]) -> None:
    from xray_cls.data import normalize

    module = load_classifier(resnet_run / "checkpoints" / "best.ckpt")
    prep = module.hparams.preprocessing
    arrays = np.load(site_data["npz"])
    source = normalize(torch.from_numpy(arrays["test_images"])[:, None], prep["mean"], prep["std"])
    site = normalize(torch.from_numpy(shifted(arrays["test_images"]))[:, None], prep["mean"], prep["std"])
    labels = torch.from_numpy(arrays["test_labels"][:, 0])

    def accuracy(net: torch.nn.Module, images: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((torch.sigmoid(net.eval()(images)) > 0.5) == labels.bool()).float().mean())

    first = batch_norm_layers(module.net)[0]
    gap_before = (feature_statistics(module.net, site)[0][0] - first.running_mean).abs().mean()
    assert accuracy(module.net, source) > 0.95 and accuracy(module.net, site) < 0.75  # the shift breaks it
    adapt_batch_norm(module.net, site.split(40))
    for (mean, var), layer in zip(feature_statistics(module.net, site), batch_norm_layers(module.net)):
        assert torch.allclose(layer.running_mean, mean, atol=1e-4)
        assert torch.allclose(layer.running_var, var, rtol=1e-3, atol=1e-5)
    assert (feature_statistics(module.net, site)[0][0] - first.running_mean).abs().mean() < gap_before / 10
    assert accuracy(module.net, site) > 0.9


def test_adapt_writes_a_checkpoint_with_its_provenance(resnet_run: Path, site_data: dict[str, Path], tmp_path: Path) -> None:
    from xray_cls.adapt import adapt

    ckpt = resnet_run / "checkpoints" / "best.ckpt"
    path = adapt(compose_config(tmp_path / "out", [f"ckpt={ckpt}", f"data.root={site_data['site']}"], name="adapt"))
    record = read_checkpoint(path)["hyper_parameters"]["adaptation"]
    files = sorted(site_data["site"].rglob("*.png"))
    assert record == {"method": "bn", "source": str(ckpt), "images": 160, "skipped": 0, "files_digest": files_digest(files),
                      "folder": str(site_data["site"])}
    adapted, original = load_classifier(path), load_classifier(ckpt)
    assert adapted.choices == original.choices  # the run's own threshold and temperature, until recalibrated
    assert not torch.equal(batch_norm_layers(adapted.net)[0].running_mean, batch_norm_layers(original.net)[0].running_mean)
    assert "optimizer_states" not in read_checkpoint(path)  # weights to evaluate, not a run to resume


def test_per_site_normalization_takes_the_sites_pixel_statistics(mlp_run: Path, site_data: dict[str, Path], tmp_path: Path) -> None:
    from xray_cls.adapt import adapt

    path = adapt(compose_config(tmp_path / "out", [f"ckpt={mlp_run / 'checkpoints' / 'best.ckpt'}", f"data.root={site_data['site']}",
                                                  "method=normalization"], name="adapt"))
    prep = read_checkpoint(path)["hyper_parameters"]["preprocessing"]
    pixels = np.concatenate([np.asarray(Image.open(p)).ravel() for p in sorted(site_data["site"].rglob("*.png"))]) / 255
    assert prep["mean"] == pytest.approx(pixels.mean(), abs=1e-6) and prep["std"] == pytest.approx(pixels.std(), abs=1e-6)


@pytest.mark.parametrize(("case", "expected"), [
    ("no batch norm", r"its MLP has no batch-norm layers, so method=bn cannot adapt it; expected a network with batch norm "
                      r"\(model=resnet\), or method=normalization"),
    ("empty folder", "holds no images"),
])
def test_adapt_refuses_in_one_line(case: str, expected: str, mlp_run: Path, tmp_path: Path, site_data: dict[str, Path]) -> None:
    from xray_cls.adapt import adapt

    root, method = site_data["site"], "bn"
    if case == "empty folder":
        root, method = tmp_path / "empty", "normalization"  # a method the MLP allows: the folder is what is refused
        root.mkdir()
        (root / ".DS_Store").write_bytes(b"\x00")
    with pytest.raises(UserInputError, match=expected):
        adapt(compose_config(tmp_path / "out", [f"ckpt={mlp_run / 'checkpoints' / 'best.ckpt'}", f"data.root={root}", f"method={method}"],
                             name="adapt"))
    assert not (tmp_path / "out").exists()


def test_recalibration_on_an_unbalanced_folder_uses_the_runs_rule(resnet_run: Path, site_data: dict[str, Path], tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from xray_cls.metrics.calibration import fit_temperature
    from xray_cls.metrics.thresholds import choose_threshold
    from xray_cls.recalibrate import recalibrate

    few = tmp_path / "labeled"
    for label, count in (("NORMAL", 40), ("PNEUMONIA", 12)):
        (few / label).mkdir(parents=True)
        for path in sorted((site_data["site"] / label).glob("*.png"))[:count]:
            (few / label / path.name).write_bytes(path.read_bytes())
    ckpt = resnet_run / "checkpoints" / "best.ckpt"
    point = recalibrate(compose_config(tmp_path / "out", [f"ckpt={ckpt}", f"data.root={few}", "bootstrap.resamples=200"],
                                       name="recalibrate"))
    assert point["images"] == {"NORMAL": 40, "PNEUMONIA": 12} and point["rule"] == "youden"
    assert "fewer than 30 of a class make a rough threshold" in caplog.text
    lo, hi = point["ci"]["specificity"]
    assert lo <= point["specificity"] <= hi

    # The same choice by hand, on those images' logits: the run's rule (youden) and calibration (temperature).
    from xray_cls.data import normalize
    from xray_cls.data.inputs import find_inputs, read_chunk

    module = load_classifier(ckpt)
    found = find_inputs(few)
    _, images = read_chunk(found.images, 28, "crop", found)
    prep = module.hparams.preprocessing
    logits = module.predict_logits(normalize(images, prep["mean"], prep["std"]))
    labels = torch.tensor([int("PNEUMONIA" in str(p)) for p in found.images])
    temperature = fit_temperature(logits, labels)
    expected = choose_threshold("youden", torch.sigmoid(logits / temperature), labels, 0.5, 0.95)
    assert point["threshold"] == pytest.approx(expected["threshold"]) and point["temperature"] == pytest.approx(temperature)

    recalibrated = read_checkpoint(tmp_path / "out" / "recalibrated.ckpt")["hyper_parameters"]
    assert recalibrated["threshold"] == point["threshold"] and recalibrated["recalibration"]["images"] == point["images"]
    assert recalibrated["recalibration"]["files_digest"] == files_digest(found.images)
    assert json.loads((tmp_path / "out" / "recalibration.json").read_text())["threshold"] == point["threshold"]
    assert load_classifier(tmp_path / "out" / "recalibrated.ckpt").choices.threshold == point["threshold"]  # predict and evaluate use it


def test_recalibration_on_one_class_is_refused(resnet_run: Path, site_data: dict[str, Path], tmp_path: Path) -> None:
    from xray_cls.recalibrate import recalibrate

    only = tmp_path / "only_normal"
    (only / "NORMAL").mkdir(parents=True)
    (only / "PNEUMONIA").mkdir()
    for path in sorted((site_data["site"] / "NORMAL").glob("*.png"))[:5]:
        (only / "NORMAL" / path.name).write_bytes(path.read_bytes())
    (only / "PNEUMONIA" / "notes.txt").write_text("no images here")
    with pytest.raises(UserInputError, match="holds no images"):
        recalibrate(compose_config(tmp_path / "out", [f"ckpt={resnet_run / 'checkpoints' / 'best.ckpt'}", f"data.root={only}"],
                                   name="recalibrate"))
    from xray_cls.evaluation.site import recalibrated_choices
    from xray_cls.metrics.val_choices import ValChoices

    with pytest.raises(UserInputError, match=r"the calibration images hold one class only \(NORMAL/PNEUMONIA = \[5, 0\]\)"):
        recalibrated_choices(ValChoices(rule="youden"), torch.zeros(5), torch.zeros(5, dtype=torch.long), 0.95)


def test_the_site_protocol_reports_the_test_part_before_and_after(resnet_run: Path, site_data: dict[str, Path], tmp_path: Path) -> None:
    metrics = evaluate_site(resnet_run, site_data["site"], tmp_path / "eval", "site.calibration_fraction=0.2", "site.adapt=bn",
                            "site.recalibrate=true")
    site = metrics["site"]
    assert site["parts"]["calibration"]["images"] + site["parts"]["test"]["images"] == 160
    assert site["parts"]["calibration"]["per_class"] == {"NORMAL": 16, "PNEUMONIA": 16}  # 20% of each class's patients
    assert metrics["n_test"] == site["before"]["n_test"] == site["parts"]["test"]["images"] == 128
    assert site["before"]["test"]["accuracy"] < 0.75 < 0.9 < metrics["test"]["accuracy"]  # the shift, and its repair
    assert site["operating_point"]["images"] == site["parts"]["calibration"]["per_class"]
    rows = (tmp_path / "eval" / "site_parts.csv").read_text().splitlines()[1:]
    assert sum(",calibration," in row for row in rows) == 32 and sum(",test," in row for row in rows) == 128
    site_ckpt = read_checkpoint(tmp_path / "eval" / "site.ckpt")["hyper_parameters"]
    assert site_ckpt["threshold"] == metrics["threshold"] and site_ckpt["site"]["calibration_images"] == {"NORMAL": 16, "PNEUMONIA": 16}


@pytest.mark.parametrize("choose", [False, True])
def test_the_test_parts_labels_change_neither_the_adapted_model_nor_its_threshold_nor_the_choice(
        choose: bool, resnet_run: Path, site_data: dict[str, Path]) -> None:
    from xray_cls.evaluation.reading import evaluation_data
    from xray_cls.evaluation.site_protocol import calibration_patients, site_candidates, site_choice, site_parts

    cfg = compose_config(Path("unused"), ["data=folder", f"data.root={site_data['site']}", "site.calibration_fraction=0.2",
                                          "site.adapt=bn", "site.adapt_on=all", "site.recalibrate=true", f"site.choose={choose}"],
                         name="evaluate")
    module = load_classifier(resnet_run / "checkpoints" / "best.ckpt")
    datamodule = evaluation_data(cfg, module.hparams.preprocessing, "crop", "test", {})
    split = datamodule.splits["test"]
    calibration, test, _ = site_parts(split, 0.2, 0)
    def candidates_and_choice() -> tuple:
        candidates, adaptation = site_candidates(cfg, "bn", module, datamodule, split, calibration)
        return candidates, adaptation, site_choice(cfg, module, candidates, calibration_patients(split, calibration)) if choose else None

    candidates, adaptation, choice = candidates_and_choice()
    split.labels[test] = 1 - split.labels[test]  # every test-part label flipped
    flipped, flipped_adaptation, flipped_choice = candidates_and_choice()
    assert flipped_choice == choice and flipped_adaptation == adaptation
    assert (choice is not None) == choose and list(flipped) == list(candidates) == (
        ["as_is", "adapted", "recalibrated", "both"] if choose else ["both"])
    for name, (model, choices, _) in candidates.items():
        assert flipped[name][1] == choices
        for (key, a), (_, b) in zip(model.state_dict().items(), flipped[name][0].state_dict().items()):
            assert torch.equal(a, b), (name, key)


def test_the_site_protocol_chooses_on_the_calibration_part_and_applies_the_choice(resnet_run: Path, site_data: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    metrics = evaluate_site(resnet_run, site_data["site"], tmp_path / "eval", "site.calibration_fraction=0.2", "site.choose=true",
                            "bootstrap.resamples=200")
    site = metrics["site"]
    choice, candidates = site["choice"], site["candidates"]
    assert list(candidates) == list(choice["candidates"]) == ["as_is", "adapted", "recalibrated", "both"]
    assert site["adapt"] == "bn" and choice["rule"] == "youden" and choice["images"] == 32 and choice["resamples"] == 200
    # The shift breaks the model as it is, and every adapted candidate beats it on the calibration part's labels.
    assert choice["chosen"] in ("adapted", "both") and site["applied"] == choice["chosen"]
    assert choice["candidates"][choice["chosen"]]["ci"][0] > 0
    assert choice["candidates"]["as_is"] == {"score": choice["candidates"]["as_is"]["score"], "difference": 0.0, "ci": [0.0, 0.0]}
    assert all(scored["ci"][0] <= scored["ci"][1] for scored in choice["candidates"].values())
    assert choice["adaptation"]["method"] == "bn" and choice["adaptation"]["images"] == 160
    assert metrics["test"] == candidates[choice["chosen"]]["test"] and metrics["threshold"] == candidates[choice["chosen"]]["threshold"]
    assert site["before"]["test"] == candidates["as_is"]["test"]
    for scored in candidates.values():
        assert sum(map(sum, scored["confusion_matrix"]["matrix"])) == scored["n_test"] == 128
    assert candidates["adapted"]["test"]["auroc"] == candidates["both"]["test"]["auroc"]  # a threshold reorders nothing
    # Adapted on every site image, labels unread, and the record says so.
    adapted_on = site["adapted_on"]
    assert adapted_on["part"] == "all" and adapted_on["images"] == 160 and adapted_on["labels_read"] is False
    assert (adapted_on["calibration_part"], adapted_on["test_part"]) == (32, 128)
    assert adapted_on["digest"] == files_digest(sorted(site_data["site"].rglob("*.png")))
    rows = (tmp_path / "eval" / "site_parts.csv").read_text().splitlines()
    assert rows[0] == "path,part,label,adapted_on" and all(row.endswith(",yes") for row in rows[1:])
    # Each layer's recorded shift is that between the checkpoint's statistics and the applied ones.
    original, applied = load_classifier(resnet_run / "checkpoints" / "best.ckpt"), load_classifier(tmp_path / "eval" / "site.ckpt")
    layers = dict(zip([name for name, m in original.net.named_modules() if m in batch_norm_layers(original.net)],
                      zip(batch_norm_layers(original.net), batch_norm_layers(applied.net))))
    assert [record["layer"] for record in adapted_on["batch_norm"]] == list(layers)
    for record in adapted_on["batch_norm"]:
        old, new = layers[record["layer"]]
        assert record["mean_shift_sd"] == pytest.approx(float(((new.running_mean - old.running_mean).abs() / old.running_var.sqrt()).mean()), rel=1e-4)
        assert record["variance_ratio"] == pytest.approx(float((new.running_var / old.running_var).log().mean().exp()), rel=1e-4)
    assert adapted_on["batch_norm"][0]["mean_shift_sd"] > 0.5  # the brightness shift shows first where the pixels arrive
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["site"]["choice"]["chosen"] == choice["chosen"]


def test_the_choice_keeps_the_model_as_it_is_unless_the_interval_says_better() -> None:
    from xray_cls.evaluation.site_choice import choose, confusion_counts, rule_scores

    labels = torch.tensor([0] * 40 + [1] * 60)
    patients = [f"p{i}" for i in range(100)]
    as_is = labels.bool().clone()
    as_is[:8] = True  # 8 of 40 NORMAL called sick: J = 0.8
    slightly = as_is.clone()
    slightly[0] = False  # one image better: inside the noise
    much = labels.bool().clone()  # every image right: J = 1

    def score(rule: str, calls: torch.Tensor) -> float:
        return float(rule_scores(rule, confusion_counts(calls, labels).sum(0), 0.95))

    assert score("youden", as_is) == pytest.approx(0.8) and score("fixed", as_is) == pytest.approx(0.92)
    missing = labels.bool().clone()
    missing[40:50] = False  # sensitivity 50/60 < 0.95: below any call that meets the target
    assert score("sensitivity", missing) < -1 < 0 < score("sensitivity", as_is) == pytest.approx(0.8)
    kept = choose({"as_is": as_is, "adapted": slightly, "recalibrated": as_is, "both": as_is}, labels, patients, "youden", 0.95,
                  500, 0.95, 0)
    assert kept["chosen"] == "as_is" and kept["candidates"]["adapted"]["ci"][0] <= 0 < kept["candidates"]["adapted"]["difference"]
    moved = choose({"as_is": as_is, "adapted": slightly, "recalibrated": much, "both": slightly}, labels, patients, "youden", 0.95,
                   500, 0.95, 0)
    assert moved["chosen"] == "recalibrated" and moved["candidates"]["recalibrated"]["difference"] == pytest.approx(0.2)
    # Patients are resampled whole: two images of one patient move together, so pairs widen the interval.
    paired = choose({"as_is": as_is.repeat(2), "adapted": slightly.repeat(2), "recalibrated": much.repeat(2), "both": as_is.repeat(2)},
                    labels.repeat(2), patients * 2, "youden", 0.95, 500, 0.95, 0)
    assert paired["patients"] == 100 and paired["images"] == 200
    assert paired["candidates"]["recalibrated"]["ci"] == pytest.approx(moved["candidates"]["recalibrated"]["ci"])


def test_out_of_fold_recalibration_refuses_a_class_of_one_patient() -> None:
    from xray_cls.evaluation.site_choice import out_of_fold_calls
    from xray_cls.metrics.val_choices import ValChoices

    labels = torch.tensor([0, 1, 1, 1, 1, 1])
    patients = ["p0", "p1", "p2", "p3", "p4", "p5"]
    with pytest.raises(UserInputError, match=r"^site.choose=true scores recalibration out of 5 patient folds, and the calibration "
                                             r"part holds 1 patient\(s\) of NORMAL; expected at least 2 of each class"):
        out_of_fold_calls(ValChoices(rule="youden"), torch.randn(6), labels, patients, 0.95, 0)
    # Each image is called at the threshold recalibrated on the folds it is not in, as a loop by hand finds it.
    from xray_cls.data.patients import patient_folds
    from xray_cls.evaluation.site import recalibrated_choices

    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 30 + [1] * 50)
    logits = torch.randn(80, generator=generator) + 1.5 * labels  # overlapping classes: thresholds differ from fold to fold
    patients = [f"patient{i}" for i in range(80)]
    calls = out_of_fold_calls(ValChoices(rule="youden"), logits, labels, patients, 0.95, 0)
    folds = torch.tensor(patient_folds(labels, patients, 5, 0))
    thresholds = set()
    for fold in range(5):
        held = folds == fold
        fitted = recalibrated_choices(ValChoices(rule="youden"), logits[~held], labels[~held], 0.95)
        thresholds.add(fitted.threshold)
        assert torch.equal(calls[held], torch.sigmoid(logits[held].double()) > fitted.threshold)
    in_sample = recalibrated_choices(ValChoices(rule="youden"), logits, labels, 0.95)
    assert len(thresholds) > 1 and not torch.equal(calls, torch.sigmoid(logits.double()) > in_sample.threshold)


def test_adabn_statistics_are_those_batch_norm_itself_measures_on_the_whole_site(resnet_run: Path, site_data: dict[str, Path]) -> None:
    """The known answer: each batch-norm layer in training mode, fed every site image as one batch
    with a cumulative average, records the exact mean and unbiased variance of its input."""
    import copy

    from xray_cls.data import normalize

    module = load_classifier(resnet_run / "checkpoints" / "best.ckpt")
    prep = module.hparams.preprocessing
    images = normalize(torch.from_numpy(shifted(np.load(site_data["npz"])["test_images"]))[:, None], prep["mean"], prep["std"])
    oracle = copy.deepcopy(module.net).eval()
    for layer in batch_norm_layers(oracle):
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    with torch.no_grad():
        oracle(images)
    before = [layer.running_mean.clone() for layer in batch_norm_layers(module.net)]
    adapt_batch_norm(module.net, images.split(48))  # batches of any size: the statistics are of all the images
    for old, ours, known in zip(before, batch_norm_layers(module.net), batch_norm_layers(oracle)):
        assert not torch.allclose(ours.running_mean, old, atol=1e-3)  # the shift moved every layer
        assert torch.allclose(ours.running_mean, known.running_mean, atol=1e-4)
        assert torch.allclose(ours.running_var, known.running_var, rtol=2e-3, atol=1e-5)


def test_the_choice_needs_bootstrap_resamples(resnet_run: Path, site_data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"^site.choose=true weighs each candidate by its bootstrap interval, and "
                                             r"bootstrap.resamples=0 is too few for one; expected bootstrap.resamples >= 100$"):
        evaluate_site(resnet_run, site_data["site"], tmp_path / "eval", "site.calibration_fraction=0.2", "site.choose=true")
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_the_site_protocol_refuses_batch_norm_adaptation_of_a_network_without_it(mlp_run: Path, site_data: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"its MLP has no batch-norm layers, so site.adapt=bn cannot adapt it; .* or "
                                             r"site.adapt=normalization"):
        evaluate_site(mlp_run, site_data["site"], tmp_path / "eval", "site.calibration_fraction=0.2", "site.adapt=bn")
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_adapt_without_a_site_folder_names_the_missing_option(mlp_run: Path, tmp_path: Path) -> None:
    from xray_cls.adapt import adapt

    with pytest.raises(UserInputError, match=r"^data.root is not set; expected data.root=/path/to/site_images$"):
        adapt(compose_config(tmp_path / "out", [f"ckpt={mlp_run / 'checkpoints' / 'best.ckpt'}"], name="adapt"))
    assert not (tmp_path / "out").exists()


def test_adaptation_on_the_calibration_part_reads_its_images_alone(resnet_run: Path, site_data: dict[str, Path], tmp_path: Path) -> None:
    metrics = evaluate_site(resnet_run, site_data["site"], tmp_path / "eval", "site.calibration_fraction=0.2", "site.adapt=bn",
                            "site.adapt_on=calibration")
    adapted_on = metrics["site"]["adapted_on"]
    assert (adapted_on["part"], adapted_on["images"], adapted_on["calibration_part"], adapted_on["test_part"]) == ("calibration", 32, 32, 0)
    assert metrics["site"]["applied"] == "adapted" and metrics["site"]["adapt"] == "bn"
    rows = [row.split(",") for row in (tmp_path / "eval" / "site_parts.csv").read_text().splitlines()[1:]]
    assert {(part, read) for _, part, _, read in rows} == {("calibration", "yes"), ("test", "no")}
    calibration = sorted(path for path, part, _, _ in rows if part == "calibration")
    assert adapted_on["digest"] == files_digest(Path(p) for p in calibration)


def test_the_choice_for_a_network_without_batch_norm_adapts_its_normalization(mlp_run: Path, site_data: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    metrics = evaluate_site(mlp_run, site_data["site"], tmp_path / "eval", "site.calibration_fraction=0.2", "site.choose=true",
                            "bootstrap.resamples=200")
    adaptation = metrics["site"]["choice"]["adaptation"]
    assert adaptation["method"] == "normalization" and "batch_norm" not in adaptation and adaptation["images"] == 160
    assert list(metrics["site"]["candidates"]) == ["as_is", "adapted", "recalibrated", "both"]
    chosen = metrics["site"]["applied"]
    assert metrics["site"]["adapt"] == ("normalization" if chosen in ("adapted", "both") else "none")
    applied = read_checkpoint(tmp_path / "eval" / "site.ckpt")["hyper_parameters"]
    assert applied["site"]["applied"] == chosen and applied["site"]["adapt"] == metrics["site"]["adapt"]


@pytest.mark.parametrize("option", ["site.choose=true", "site.adapt=bn", "site.recalibrate=true"])
def test_site_options_without_a_calibration_part_are_refused(option: str, mlp_run: Path, site_data: dict[str, Path],
                                                             tmp_path: Path) -> None:
    from xray_cls.evaluate import evaluate

    with pytest.raises(UserInputError, match=rf"^{option} acts on a site's calibration part, and site.calibration_fraction is null; "
                                             r"expected site.calibration_fraction=<the share"):
        evaluate(compose_config(tmp_path / "eval", [f"ckpt={mlp_run / 'checkpoints' / 'best.ckpt'}", "data=folder",
                                                    f"data.root={site_data['site']}", option], name="evaluate"))
    assert not (tmp_path / "eval" / "metrics.json").exists()
