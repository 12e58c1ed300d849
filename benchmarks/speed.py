"""Speed benchmark of xray_cls: what the framework costs over a hand-written loop.

    python benchmarks/speed.py            # the full benchmark (about 15 minutes on 2 CPU cores)
    python benchmarks/speed.py --quick    # a smoke test of every measurement (about 2 minutes)

Each figure is the median of --repeats runs; ratios compare runs made in this same invocation,
alternating the two sides so that drift on a shared machine hits both. The last line is
machine-readable (RESULT ...).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from xray_cls.data import ImageFolderDataModule, PneumoniaMNISTDataModule
from xray_cls.train import CONFIG_DIR, train

QUIET = ["trainer.enable_progress_bar=false"]


def median_of(repeats: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeats))


def compose_run(out_dir: Path, overrides: list[str]):  # noqa: ANN201
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out_dir}", *QUIET, *overrides])


def project_fit_seconds(overrides: list[str]) -> float:
    """Wall time of trainer.fit through the project (its metrics.json's train_seconds)."""
    with tempfile.TemporaryDirectory() as out:
        return train(compose_run(Path(out), overrides))["train_seconds"]


def plain_fit_seconds(overrides: list[str]) -> float:
    """The same network, data tensors, batch size, optimizer and threads in a hand-written loop:
    per epoch a shuffled training pass and a validation pass, each tracking loss and accuracy
    (the study's curves)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_run(Path(out), overrides)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(cfg.trainer.deterministic)  # as the project's Trainer does
    dm: PneumoniaMNISTDataModule = instantiate(cfg.data, seed=cfg.seed)
    dm.setup()
    net = instantiate(OmegaConf.to_container(cfg.model), in_channels=dm.in_channels, image_size=dm.image_size)
    optimizer = instantiate(cfg.optimizer)(net.parameters())
    loss_fn = torch.nn.BCEWithLogitsLoss()
    train_split, val_split, batch = dm.splits["train"], dm.splits["val"], cfg.data.batch_size
    started = time.perf_counter()
    for _ in range(cfg.trainer.max_epochs):
        net.train()
        order = torch.randperm(len(train_split))
        correct, total_loss = 0, 0.0
        for i in range(0, len(order), batch):
            index = order[i : i + batch]
            labels = train_split.labels[index]
            logits = net(dm.preprocess(train_split.images[index], train=True))
            loss = loss_fn(logits, labels.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            correct += ((logits > 0).long() == labels).sum().item()
        net.eval()
        correct, total_loss = 0, 0.0
        with torch.no_grad():
            for i in range(0, len(val_split), batch):
                labels = val_split.labels[i : i + batch]
                logits = net(dm.preprocess(val_split.images[i : i + batch]))
                total_loss += loss_fn(logits, labels.float()).item() * len(labels)
                correct += ((logits > 0).long() == labels).sum().item()
    return time.perf_counter() - started


def paired_ratio(repeats: int, slow: Callable[[], float], fast: Callable[[], float]) -> tuple[float, float, float]:
    """(median of slow, median of fast, their ratio), the two measured in turn."""
    slow_times, fast_times = [], []
    for _ in range(repeats):
        slow_times.append(slow())
        fast_times.append(fast())
    s, f = statistics.median(slow_times), statistics.median(fast_times)
    return s, f, s / f


def process_seconds(cmd: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def startup_seconds(workdir: Path) -> float:
    """Process start to the first training step of `python -m xray_cls` (a callback stamps it)."""
    stamp = workdir / "first_step"
    stamp.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [
        sys.executable, "-m", "xray_cls", *QUIET, "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "+callbacks.first_step._target_=first_step.FirstStepStamp", f"+callbacks.first_step.path={stamp}",
        f"hydra.run.dir={tempfile.mkdtemp(dir=workdir)}",  # a new run folder each time
    ]
    started = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return float(stamp.read_text()) - started


def write_kermany_folder(root: Path, n_images: int, height: int, width: int) -> None:
    """A Kermany-like folder: JPEGs of chest-X-ray size in train/test/{NORMAL,PNEUMONIA}."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8, width // 8), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR))
    for i in range(n_images):
        split = "test" if i % 10 == 0 else "train"
        label = "PNEUMONIA" if i % 3 else "NORMAL"
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.roll(texture, (i * 7) % height, axis=0) // 2 + (i % 100)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:05d}.jpeg", quality=90)


def folder_epoch_seconds(root: Path, cache: Path, size: int) -> tuple[float, float, float]:
    """Data-loading time (read/decode or cache, then every training batch prepared as in training)
    of epoch 1 and epoch 2 of one run, and of epoch 1 of a second run."""

    def one_epoch(dm: ImageFolderDataModule) -> float:
        started = time.perf_counter()
        for images, _ in dm.train_dataloader():
            dm.preprocess(images, train=True)
        return time.perf_counter() - started

    def new_run() -> tuple[ImageFolderDataModule, float]:
        started = time.perf_counter()
        dm = ImageFolderDataModule(root=str(root), image_size=size, cache_dir=str(cache), aug="strong")
        dm.setup()
        return dm, time.perf_counter() - started

    dm, setup = new_run()
    epoch1 = setup + one_epoch(dm)
    epoch2 = one_epoch(dm)
    dm2, setup2 = new_run()
    return epoch1, epoch2, setup2 + one_epoch(dm2)


def peak_rss_mb(cmd: list[str], env: dict[str, str]) -> float:
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small version of every measurement")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (default 3, quick 1)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    epochs = ["trainer.max_epochs=2"] if args.quick else []  # the default: 12
    n_images, height, width = (300, 600, 500) if args.quick else (5000, 1200, 1000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, repeats {repeats}")

    rows = []
    cnn = paired_ratio(repeats, lambda: project_fit_seconds(["model=cnn", *epochs]), lambda: plain_fit_seconds(["model=cnn", *epochs]))
    rows.append(("framework overhead, CNN fit (project / plain loop)", cnn, 1.05))
    mlp = paired_ratio(repeats, lambda: project_fit_seconds(["model=mlp", *epochs]), lambda: plain_fit_seconds(["model=mlp", *epochs]))
    rows.append(("framework overhead, MLP fit (project / plain loop)", mlp, 1.25))
    aug = paired_ratio(
        repeats,
        lambda: project_fit_seconds(["model=cnn", "data.aug=strong", *epochs]),
        lambda: project_fit_seconds(["model=cnn", "data.aug=none", *epochs]),
    )
    rows.append(("augmentation cost, CNN fit (aug=strong / none)", aug, 1.15))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        startup = paired_ratio(
            repeats,
            lambda: startup_seconds(work),
            lambda: process_seconds([sys.executable, "-c", "import torch, torchvision, lightning"]),
        )
        rows.append(("start-up to first step / import torch+torchvision+lightning", startup, 1.3))

        root, cache = work / "chest_xray", work / "cache"
        started = time.perf_counter()
        write_kermany_folder(root, n_images, height, width)
        print(f"wrote {n_images} JPEGs of {width}x{height} px in {time.perf_counter() - started:.0f} s")
        epoch1, epoch2, rerun = folder_epoch_seconds(root, cache, size=64)

        env = {**os.environ, "XDG_CACHE_HOME": str(work / "rss_cache")}
        short = [*QUIET, "trainer.max_epochs=1"]
        default_rss = peak_rss_mb([sys.executable, "-m", "xray_cls", *short, f"hydra.run.dir={work / 'rss'}"], env)
        folder_rss = peak_rss_mb(
            [sys.executable, "-m", "xray_cls", *short, f"hydra.run.dir={work / 'rss_folder'}", "data=folder",
             f"data.root={root}", "data.image_size=64"], env
        )

    print()
    print(f"{'measurement':<62}{'A (s)':>9}{'B (s)':>9}{'A/B':>8}{'goal':>8}")
    for name, (a, b, ratio), goal in rows:
        print(f"{name:<62}{a:>9.2f}{b:>9.2f}{ratio:>8.3f}{'<= ' + str(goal):>8}")
    print(f"image folder ({n_images} JPEGs, image_size 64): data loading of epoch 1 {epoch1:.2f} s, "
          f"epoch 2 {epoch2:.3f} s ({epoch2 / epoch1:.4f}), second run's epoch 1 {rerun:.3f} s ({rerun / epoch1:.4f}); goal <= 0.1")
    print(f"peak RSS (1 epoch): default run {default_rss:.0f} MB, folder run {folder_rss:.0f} MB")
    print(
        f"RESULT cnn_overhead={cnn[2]:.3f} mlp_overhead={mlp[2]:.3f} aug_cost={aug[2]:.3f} startup={startup[2]:.3f} "
        f"folder_epoch2={epoch2 / epoch1:.4f} folder_rerun={rerun / epoch1:.4f} default_rss_mb={default_rss:.0f}"
    )


if __name__ == "__main__":
    main()
