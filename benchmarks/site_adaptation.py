"""Why batch-norm adaptation helps or hurts a trained run at a site: one checkpoint's AdaBN measured
on the site and, as a control with no site shift at all, on its own data's test split.

    python benchmarks/site_adaptation.py --ckpt RUN/checkpoints/best.ckpt --source /path/to/chest_xray_train224 --site bundled
    python benchmarks/site_adaptation.py --ckpt RUN/checkpoints/best.ckpt --source bundled --site /path/to/chest_xray_train224

RUN is a training run (its config.yaml gives the augmentation it trained with); --source is the
data it trained on (a Kermany folder, whose splits the checkpoint records, or `bundled`); --site is
another site's labeled folder, `bundled` (PneumoniaMNIST's test split as PNGs), or, with --source
bundled, a Kermany folder whose development test (as `+experiment=best_folder seed=1` draws it)
is the site. Each row re-estimates the batch-norm statistics one way and scores the images named
at its run's own threshold: accuracy, AUROC, sensitivity, specificity, the mean logit, and how far
the statistics moved (first layer; the largest of the others), in the old standard deviations and
as a variance ratio. The source test split is the development test a folder run drew from train by
patient, or the bundled data's official test split. Rows that read labels to choose images (the
class mix) are diagnostics, never a protocol. First come the pixels of each: mean, standard
deviation, sharpness (mean |Laplacian|) and the mean of the three outer columns; the last lines
bound what any threshold could give the model on the site's test part: they read that part's
labels, so they are upper limits to report, not choices.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from xray_cls.data.augment import BatchAugment, augment_preset
from xray_cls.evaluation.reading import recorded_splits
from xray_cls.evaluation.site import adapt_batch_norm, batch_norm_layers, forward_order, input_statistics, statistics_shift
from xray_cls.evaluation.site_protocol import site_parts
from xray_cls.models.checkpoints import load_classifier

sys.path.insert(0, str(Path(__file__).parent))
from sites import split_of, threshold_bounds, write_bundled_test, write_development_test

BATCH = 256


class Measure:
    """One checkpoint, its preprocessing and train-time augmentation, and the ways of re-estimating its statistics."""

    def __init__(self, ckpt: Path) -> None:
        self.module = load_classifier(ckpt)
        self.prep = self.module.hparams.preprocessing
        data = yaml.safe_load((ckpt.parent.parent / "config.yaml").read_text())["data"]
        self.augment = BatchAugment(augment_preset(data.get("aug", "none"), data.get("aspect", 0.0)))

    def batches(self, images: torch.Tensor, augmented: bool = False, copies: int = 1) -> list[torch.Tensor]:
        out = []
        for _ in range(copies):
            x = images.float() / 255
            x = self.augment(x) if augmented else x
            out += list(((x - self.prep["mean"]) / self.prep["std"]).split(BATCH))
        return out

    def adabn(self, images: torch.Tensor, augmented: bool = False, copies: int = 1) -> Any:
        adapted = copy.deepcopy(self.module)
        adapt_batch_norm(adapted.net, self.batches(images, augmented, copies))
        return adapted

    def relative(self, images: torch.Tensor, reference: torch.Tensor) -> Any:
        """AdaBN that moves each layer's statistics by the site's difference from `reference`
        images' exact ones, instead of replacing them: the identity when the site is the reference."""
        adapted = copy.deepcopy(self.module)
        net, source = adapted.net.eval(), self.module.net.eval()
        site_batches, reference_batches = self.batches(images), self.batches(reference)
        pairs = dict(zip(batch_norm_layers(net), batch_norm_layers(source)))
        with torch.no_grad():
            for layer in forward_order(net, list(pairs), site_batches[0]):
                mean, var = input_statistics(net, layer, site_batches)
                ref_mean, ref_var = input_statistics(source, pairs[layer], reference_batches)
                layer.running_mean.add_(mean - ref_mean)
                layer.running_var.mul_(var / ref_var.clamp(min=1e-12))
        return adapted

    def logits(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        return model.predict_logits(torch.cat(self.batches(images))).flatten()

    def row(self, name: str, model: Any, split: Any) -> str:
        from torchmetrics.functional.classification import binary_auroc

        logits = self.logits(model, split.images)
        probs, labels = torch.sigmoid(logits / model.choices.temperature), split.labels
        called, positive = probs > model.choices.threshold, labels.bool()
        shifts = [(layer["mean_shift_sd"], layer["variance_ratio"]) for layer in statistics_shift(self.module.net, model.net)]
        deeper = max(shifts[1:], key=lambda s: s[0]) if len(shifts) > 1 else (0.0, 1.0)
        return (f"| {name} | {len(split)} | {float((called == positive).float().mean()):.3f} | {float(binary_auroc(probs, labels)):.4f} | "
                f"{float((called & positive).sum() / positive.sum()):.3f} | {float((~called & ~positive).sum() / (~positive).sum()):.3f} | "
                f"{float(logits.mean()):+.2f} | {shifts[0][0]:.2f} / {shifts[0][1]:.2f} | {deeper[0]:.2f} / {deeper[1]:.2f} |")


def pixel_line(name: str, images: torch.Tensor) -> str:
    x = images.float().flatten(0, 1) / 255  # (N * C, H, W)
    laplacian = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return (f"  {name:<18} mean {float(x.mean()):.3f}  std {float(x.std()):.3f}  sharpness {float(laplacian.abs().mean()):.3f}  "
            f"outer columns {float(torch.cat([x[..., :3], x[..., -3:]], -1).mean()):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--source", required=True, help="the data the run trained on: a Kermany folder, or `bundled`")
    parser.add_argument("--site", required=True, help="a labeled folder, `bundled`, or (with --source bundled) a Kermany folder")
    parser.add_argument("--fraction", type=float, default=0.2, help="the calibration part of the site (default 0.2)")
    args = parser.parse_args()
    torch.manual_seed(0)
    measure = Measure(args.ckpt)
    prep = measure.prep
    with tempfile.TemporaryDirectory() as written:
        if args.site == "bundled":
            site_root = write_bundled_test(Path(written))
        elif args.source == "bundled":
            site_root = write_development_test(Path(args.site), Path(written))  # links: read before they go
        else:
            site_root = Path(args.site)
        site = split_of(args.ckpt, prep, ["data=folder", f"data.root='{site_root}'"], "test", {})
    source_data = ["data=pneumoniamnist"] if args.source == "bundled" else ["data=folder", f"data.root='{args.source}'"]
    recorded = {} if args.source == "bundled" else recorded_splits(args.ckpt)
    dev, train = (split_of(args.ckpt, prep, source_data, name, recorded) for name in ("test", "train"))
    calibration, test, _ = site_parts(site, args.fraction, 0, prep["class_names"])
    site_test = site.subset(test)
    share = [f"{float((s.labels == 0).float().mean()):.3f}" for s in (train, dev, site)]
    print(f"{args.ckpt}: {prep['class_names'][0]} share train / source test split / site {' / '.join(share)}; "
          f"site test part {len(test)} images, calibration part {len(calibration)}")
    print("pixels:\n" + "\n".join(pixel_line(name, split.images) for name, split in
                                   (("source train", train), ("source test split", dev), ("site", site))))
    normal, sick = (site.labels == 0).nonzero().flatten(), (site.labels == 1).nonzero().flatten()
    keep = round(float((train.labels == 0).float().mean()) / float((train.labels == 1).float().mean()) * len(sick))
    mixed = torch.cat([normal[torch.randperm(len(normal))[:keep]], sick]) if keep < len(normal) else torch.arange(len(site))
    print("| statistics | images scored | ACC | AUROC | sensitivity | specificity | mean logit | first layer: mean shift (sd) / var ratio "
          "| largest deeper layer |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [
        ("site test part: the run's own", measure.module, site_test),
        (f"site test part: AdaBN on the calibration part ({len(calibration)})", measure.adabn(site.gather(calibration)), site_test),
        (f"site test part: AdaBN on every site image ({len(site)})", measure.adabn(site.images), site_test),
        (f"site test part: AdaBN on the site resampled to train's class mix ({len(mixed)}; labels read)" if keep < len(normal) else
         f"site test part: AdaBN on every site image (its NORMAL share is below train's: nothing to resample; {len(site)})",
         measure.adabn(site.images[mixed]), site_test),
        ("site test part: AdaBN on every site image, train augmentation, 4 copies", measure.adabn(site.images, True, 4), site_test),
        ("site test part: relative AdaBN, every site image against the train images", measure.relative(site.images, train.images), site_test),
        ("source test split: the run's own", measure.module, dev),
        ("source test split: AdaBN on itself (no site shift)", measure.adabn(dev.images), dev),
        ("source test split: AdaBN on the train images, unaugmented", measure.adabn(train.images), dev),
        ("source test split: AdaBN on the train images, train augmentation, 2 copies", measure.adabn(train.images, True, 2), dev),
    ]
    for name, model, split in rows:
        print(measure.row(name, model, split), flush=True)
    for name, model in (("the run's own", measure.module), ("AdaBN on every site image", rows[2][1])):
        best, bound = threshold_bounds(torch.sigmoid(measure.logits(model, site_test.images).double()), site_test.labels)
        print(f"{name}, on the site test part (its labels read: a bound, not a choice): best ACC of any threshold {best:.4f}; "
              f"with specificity >= 0.90 {bound:.4f}")


if __name__ == "__main__":
    main()
