"""Speed benchmark of xray_cls: what the framework costs over a hand-written loop.

    python benchmarks/speed.py            # the full benchmark: 4 repeats of 12-epoch fits (about 17 minutes on 2 CPU cores)
    python benchmarks/speed.py --quick    # a smoke test of every measurement
    python benchmarks/speed.py --gpu      # resnet50 and densenet121 at 224 px on a GPU: a few minutes

The project side is what users run: `python -m xray_cls` with its defaults (progress bar, Hydra's
console log), in a pseudo-terminal so that the bar draws as it would on a user's screen; a fit's
time is its metrics.json's train_seconds. Each figure is the median of --repeats runs; ratios
compare runs made in this same invocation, the two sides in ABBA order (A B B A A B ...) so that
drift on a shared machine hits both alike. Each goal prints PASS or FAIL; the last line is
machine-readable (RESULT ...).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
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
from xray_cls.models.pretrained import PRETRAINING_KEYS
from xray_cls.runtime.configs import CONFIG_DIR

BENCHMARKS = Path(__file__).parent


def compose_run(out_dir: Path, overrides: list[str]):  # noqa: ANN201
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out_dir}", *overrides])


def run_in_terminal(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Runs `cmd` with a pseudo-terminal as its stdout and stderr, as a user's shell would (the
    progress bar draws, the log prints), reading and dropping what it writes. Returns its peak RSS
    in MB."""
    reader, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns, 40 rows
    process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    tail = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # the process has closed the terminal
                return
            if not chunk:
                return
            tail[:] = (tail + chunk)[-4000:]

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    _, status, usage = os.wait4(process.pid, 0)
    drainer.join()
    os.close(reader)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{tail.decode(errors='replace')}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def project_fit(overrides: list[str], work: Path) -> tuple[float, float]:
    """(train_seconds from metrics.json, peak RSS in MB) of `python -m xray_cls OVERRIDES`."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    rss = run_in_terminal([sys.executable, "-m", "xray_cls", *overrides, f"hydra.run.dir={run_dir}"])
    return json.loads((run_dir / "metrics.json").read_text())["train_seconds"], rss


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
    arguments = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k not in PRETRAINING_KEYS}  # how to start, not what to build
    net = instantiate(arguments, in_channels=dm.in_channels, image_size=dm.image_size)
    optimizer = instantiate(cfg.optimizer)(net.parameters())
    loss_fn = torch.nn.BCEWithLogitsLoss()
    train_split, val_split, batch = dm.splits["train"], dm.splits["val"], cfg.data.batch_size
    train_images, val_images = batches_of(cfg.trainer.get("limit_train_batches"), len(train_split), batch), \
        batches_of(cfg.trainer.get("limit_val_batches"), len(val_split), batch)
    started = time.perf_counter()
    for _ in range(cfg.trainer.max_epochs):
        net.train()
        order = torch.randperm(len(train_split))[:train_images]
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
            for i in range(0, val_images, batch):
                labels = val_split.labels[i : i + batch]
                logits = net(dm.preprocess(val_split.images[i : i + batch]))
                total_loss += loss_fn(logits, labels.float()).item() * len(labels)
                correct += ((logits > 0).long() == labels).sum().item()
    return time.perf_counter() - started


def batches_of(limit: int | float | None, size: int, batch: int) -> int:
    """The images an epoch of `size` covers under Lightning's limit_*_batches (a count, or a share)."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return size
    return min(size, int(limit) * batch if isinstance(limit, int) else int(limit * size))


def abba(repeats: int, a: Callable[[], float], b: Callable[[], float]) -> tuple[list[float], list[float]]:
    """`repeats` measurements of each side, in the order A B B A A B B A ..."""
    a_values: list[float] = []
    b_values: list[float] = []
    for i in range(repeats):
        for side in ((a, b) if i % 2 == 0 else (b, a)):
            (a_values if side is a else b_values).append(side())
    return a_values, b_values


def paired_ratio(repeats: int, a: Callable[[], float], b: Callable[[], float]) -> tuple[float, float, float]:
    """(median of A, median of B, their ratio), measured in ABBA order."""
    a_values, b_values = abba(repeats, a, b)
    median_a, median_b = statistics.median(a_values), statistics.median(b_values)
    return median_a, median_b, median_a / median_b


def process_seconds(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def startup_seconds(work: Path, packages: list[str]) -> float:
    """Process start to the first training step of `python -m xray_cls` (a callback stamps it).
    The first call fills `packages` with the third-party packages the run had loaded by then."""
    stamp = work / "first_step.json"
    stamp.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")]))}
    cmd = [
        sys.executable, "-m", "xray_cls", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "+callbacks.first_step._target_=first_step.FirstStepStamp", f"+callbacks.first_step.path={stamp}",
        f"hydra.run.dir={tempfile.mkdtemp(dir=work)}",  # a new run folder each time
    ]
    started = time.time()
    run_in_terminal(cmd, env)
    first_step = json.loads(stamp.read_text())
    packages[:] = packages or first_step["packages"]
    return first_step["time"] - started


def import_seconds(packages: list[str]) -> float:
    """Process start to the end of importing `packages`, in a fresh interpreter."""
    return process_seconds([sys.executable, "-c", "import " + ", ".join(packages)])


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


def goal_line(name: str, a: str, b: str, ratio: float, goal: float) -> str:
    verdict = "PASS" if ratio <= goal else "FAIL"
    return f"{name:<62}{a:>10}{b:>10}{ratio:>8.3f}{'<= ' + str(goal):>9}  {verdict}"


GPU_NETWORKS = ("resnet50", "densenet121")
GPU_SIZE, GPU_BATCH = 224, 64


def gpu_overrides(model: str, batches: int) -> list[str]:
    """A trainer=gpu fit of `batches` train batches at 224 px (the bundled images resized), from scratch."""
    return ["trainer=gpu", f"model={model}", f"data.image_size={GPU_SIZE}", f"data.batch_size={GPU_BATCH}",
            "trainer.max_epochs=1", f"trainer.limit_train_batches={batches}", "trainer.limit_val_batches=0",
            "bootstrap.resamples=0", "gradcam_samples=0", "trainer.enable_progress_bar=false"]


def plain_gpu_images_per_second(model: str, batches: int) -> tuple[float, float]:
    """(images/s, peak GPU memory in GiB) of the same network in a hand-written bf16 loop on GPU
    tensors, timed after a warm-up of 5 batches."""
    from xray_cls.models.networks import build_network

    device = torch.device("cuda")
    net = build_network({"_target_": "xray_cls.models.backbones.TorchvisionNet", "name": model, "in_channels": 1,
                         "image_size": GPU_SIZE}).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    images = torch.randn(GPU_BATCH, 1, GPU_SIZE, GPU_SIZE, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (GPU_BATCH,), device=device).float()
    torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(batches):
        step()
    torch.cuda.synchronize()
    return batches * GPU_BATCH / (time.perf_counter() - started), torch.cuda.max_memory_allocated() / 2**30


def gpu_main(batches: int) -> None:
    """trainer=gpu fits of GPU_NETWORKS against the plain loop: images/s and the plain loop's peak memory."""
    if not torch.cuda.is_available():
        print("error: --gpu needs a CUDA GPU; torch.cuda.is_available() is false on this machine", file=sys.stderr)
        sys.exit(2)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, {GPU_SIZE} px, batch {GPU_BATCH}, {batches} batches")
    values = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in GPU_NETWORKS:
            seconds, _ = project_fit(gpu_overrides(model, batches), Path(tmp))
            project_rate = batches * GPU_BATCH / seconds  # train_seconds include the start of the fit
            plain_rate, peak = plain_gpu_images_per_second(model, batches)
            print(f"  {model:<12} project {project_rate:8.1f} img/s   plain loop {plain_rate:8.1f} img/s   "
                  f"ratio {project_rate / plain_rate:.2f}   plain peak memory {peak:.1f} GiB")
            values += [f"{model}_images_per_s={project_rate:.1f}", f"{model}_plain_images_per_s={plain_rate:.1f}",
                       f"{model}_peak_gib={peak:.2f}"]
    print("RESULT gpu=" + torch.cuda.get_device_name().replace(" ", "_") + " " + " ".join(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small version of every measurement")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (default 4, quick 1)")
    parser.add_argument("--gpu", action="store_true", help=f"{', '.join(GPU_NETWORKS)} at {GPU_SIZE} px on a GPU instead")
    args = parser.parse_args()
    if args.gpu:
        return gpu_main(10 if args.quick else 100)
    repeats = args.repeats or (1 if args.quick else 4)
    # --quick: 1 epoch of 30 batches (both sides), and none of the after-training work (bootstrap, Grad-CAM)
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=30", "trainer.limit_val_batches=5", "bootstrap.resamples=0",
             "gradcam_samples=0"] if args.quick else []  # default: 12 epochs
    n_images, height, width = (300, 600, 500) if args.quick else (5000, 1200, 1000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, repeats {repeats}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = []
        default_rss: list[float] = []

        def project(overrides: list[str], rss: list[float] | None = None) -> Callable[[], float]:
            def measure() -> float:
                seconds, peak = project_fit([*overrides, *short], work)
                if rss is not None:
                    rss.append(peak)
                return seconds
            return measure

        def plain(overrides: list[str]) -> Callable[[], float]:
            return lambda: plain_fit_seconds([*overrides, *short])

        cnn = paired_ratio(repeats, project([], default_rss), plain(["model=cnn"]))  # model=cnn is the default
        rows.append(("framework overhead, CNN fit (project / plain loop)", cnn, 1.05))
        mlp = paired_ratio(repeats, project(["model=mlp"]), plain(["model=mlp"]))
        rows.append(("framework overhead, MLP fit (project / plain loop)", mlp, 1.25))
        aug = paired_ratio(repeats, project(["data.aug=strong"]), project(["data.aug=none"]))
        rows.append(("augmentation cost, CNN fit (aug=strong / none)", aug, 1.15))

        packages: list[str] = []
        startup = paired_ratio(repeats, lambda: startup_seconds(work, packages), lambda: import_seconds(packages))
        rows.append(("start-up to first step / importing its packages", startup, 1.3))

        root = work / "chest_xray"
        started = time.perf_counter()
        write_kermany_folder(root, n_images, height, width)
        print(f"wrote {n_images} JPEGs of {width}x{height} px in {time.perf_counter() - started:.0f} s")
        folder = [folder_epoch_seconds(root, work / f"cache_{i}", size=64) for i in range(repeats)]  # a new cache each time
        epoch1, epoch2, rerun = (statistics.median(times) for times in zip(*folder))
        folder_rss = statistics.median(
            run_in_terminal([
                sys.executable, "-m", "xray_cls", "trainer.max_epochs=1", *short[3:], f"hydra.run.dir={work / f'rss_folder_{i}'}",
                "data=folder", f"data.root={root}", "data.image_size=64", f"data.cache_dir={work / f'rss_cache_{i}'}",
            ])
            for i in range(repeats)
        )

    print()
    print("start-up reference: python -c 'import " + ", ".join(packages) + "'")
    print(f"{'measurement':<62}{'A (s)':>10}{'B (s)':>10}{'A/B':>8}{'goal':>9}")
    for name, (a, b, ratio), goal in rows:
        print(goal_line(name, f"{a:.2f}", f"{b:.2f}", ratio, goal))
    print(f"image folder ({n_images} JPEGs, image_size 64), data loading:")
    print(goal_line("  epoch 2 / epoch 1 of a run", f"{epoch2:.3f}", f"{epoch1:.2f}", epoch2 / epoch1, 0.1))
    print(goal_line("  a second run's epoch 1 (disk cache) / epoch 1", f"{rerun:.3f}", f"{epoch1:.2f}", rerun / epoch1, 0.1))
    epochs = "1 epoch" if args.quick else "12 epochs"
    print(f"peak RSS, medians: default run ({epochs}) {statistics.median(default_rss):.0f} MB, folder run (1 epoch) {folder_rss:.0f} MB")
    print(
        f"RESULT cnn_overhead={cnn[2]:.3f} mlp_overhead={mlp[2]:.3f} aug_cost={aug[2]:.3f} startup={startup[2]:.3f} "
        f"folder_epoch2={epoch2 / epoch1:.4f} folder_rerun={rerun / epoch1:.4f} default_rss_mb={statistics.median(default_rss):.0f}"
    )


if __name__ == "__main__":
    main()
