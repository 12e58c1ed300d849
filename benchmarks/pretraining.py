"""The side-by-side of `benchmarks/accuracy.py --pretrain`: a task's recipe from scratch, fine-tuned
from a self-supervised backbone, and as a linear probe of that backbone frozen.

For each task, one pretraining (`python -m xray_cls.pretrain`) on the folder's images with the
task's own test split left out (the development test drawn from train, as the recipe draws it),
labels never read; then, for each seed, the recipe three ways with the same architecture, image
size and epochs: from scratch, `model.weights=<backbone.pth>`, and that with
`model.freeze_epochs` = every epoch (only the output layer trains). Every choice is the recipe's,
made on val; each run's development test is evaluated once and reported.
"""

from __future__ import annotations

import csv
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from hydra import compose, initialize_config_dir

from xray_cls.pretrain import pretrain
from xray_cls.runtime.configs import CONFIG_DIR

ALL_EPOCHS = 10_000  # model.freeze_epochs beyond any run's length: the backbone never trains


def share(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def pretrained(root: Path, task: str, image_size: int, epochs: int, method: str, out: Path, overrides: list[str]) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("pretrain", overrides=[
            f"paths.output_dir={out}", "data=folder", f"data.root={root}", f"data.image_size={image_size}", f"task={task}",
            "model=resnet", f"ssl={method}", f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false", *overrides])
    started = time.monotonic()
    metrics = pretrain(cfg)
    minutes = (time.monotonic() - started) / 60
    rows = list(csv.DictReader((out / "curves.csv").open()))  # what the pretraining learned, epoch by epoch
    print("  pretraining: epoch, loss, kNN accuracy on val: " + "; ".join(
        f"{r['epoch']} {float(r['loss/pretrain_epoch']):.3f} {share(float(r['knn_acc/val']) if r.get('knn_acc/val') else None)}"
        for i, r in enumerate(rows) if i % 10 == 0 or i == len(rows) - 1))
    return {**metrics, "minutes": minutes, "backbone": out / "backbone.pth"}


def side_by_side(run: Callable[[list[str], int], dict[str, Any]], recipe: list[str], root: Path, task: str, seeds: list[int],
                 epochs: int, method: str, pretrain_overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as out:
        done = pretrained(root, task, 28, epochs, method, Path(out), pretrain_overrides)
        record = done["pretraining"]
        print(f"\n{task}: {method} pretraining, {epochs} epochs on {record['images']} images ({record['sources']}), "
              f"{done['minutes']:.1f} min, kNN accuracy on val {share(record['knn_acc_val'])}")
        arms = {"scratch": [], "fine-tuned": [f"model.weights={done['backbone']}"],
                "linear probe": [f"model.weights={done['backbone']}", f"model.freeze_epochs={ALL_EPOCHS}"]}
        results = {arm: [run([*recipe, *extra], seed) for seed in seeds] for arm, extra in arms.items()}
    print(f"  {'arm':<13} {'seed':>4}  {'ACC':>6}  {'AUROC':>6}  {'sens':>6}  {'spec':>6}  {'train min':>9}")
    summary = []
    for arm, runs in results.items():
        for r in runs:
            t = r["test"]
            print(f"  {arm:<13} {r['hparams']['seed']:>4}  {t['accuracy']:.4f}  {t['auroc']:.4f}  {t.get('recall', float('nan')):.4f}  "
                  f"{t.get('specificity', float('nan')):.4f}  {r['train_seconds'] / 60:>9.2f}")
        acc, auroc = ([r["test"][k] for r in runs] for k in ("accuracy", "auroc"))
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"  {arm:<13} mean  {statistics.mean(acc):.4f}  {statistics.mean(auroc):.4f}  (ACC std {spread:.4f})")
        name = arm.replace(" ", "_").replace("-", "_")
        summary += [f"{name}_acc={statistics.mean(acc):.4f}", f"{name}_auroc={statistics.mean(auroc):.4f}"]
    print(f"RESULT task={task} method={method} pretrain_epochs={epochs} pretrain_minutes={done['minutes']:.1f} "
          f"knn_acc={share(record['knn_acc_val'])} seeds={len(seeds)} " + " ".join(summary))
