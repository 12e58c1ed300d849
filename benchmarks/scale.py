"""Scale benchmark of xray_cls: image folders served from their memory-mapped decode cache.

    python benchmarks/scale.py                      # 2,000, 10,000 and 40,000 JPEGs of 512x512 px
    python benchmarks/scale.py --sizes 2000,10000   # chosen folder sizes
    python benchmarks/scale.py --quick              # a smoke test of every measurement (tiny folders)
    python benchmarks/scale.py --table              # the same images read through data=table (a generated labels.csv)

Each size runs in a fresh process: the folder's first decode into an empty cache (images/s), then
one epoch of the default CNN at data.image_size=128 with `train()`, reading the mapped cache (fit
seconds, train and val pass, per 1,000 images of the train folder), while a thread samples the
process's anonymous memory (RssAnon in /proc/self/status); peak RSS is the kernel's. The smallest
size also runs the in-memory path (data.cache_dir=null), before and after the others, and the mean of
the two is the reference of the time goal. The
synthetic folders are kept in --data between invocations (a --quick run uses a temporary one).

Goals: peak RssAnon at the largest size <= 1.2x that at the smallest; seconds per 1,000 images at
the largest size <= 1.2x those of the in-memory path at the smallest. The last line is
machine-readable: RESULT anon_growth= time_growth= decode_ips= (the largest folder's first decode).
With --table, every measurement reads the same images through `data=table` and a generated
labels.csv (path, label, patient, split) instead of the class folders; the goals are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_DATA = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "xray_cls" / "scale_benchmark"


def synthetic_folder(data_dir: Path, n_images: int, side: int) -> Path:
    """A Kermany-layout folder of `n_images` JPEGs of side x side px, written once and kept: built
    under a temporary name and renamed, so an interrupted build is never reused."""
    # benchmarks/ is on sys.path when run as a script
    from speed import write_kermany_folder

    root = data_dir / f"{n_images}x{side}"
    if not root.is_dir():
        building = data_dir / f".{root.name}.{os.getpid()}.building"
        started = time.perf_counter()
        write_kermany_folder(building, n_images, side, side)
        building.rename(root)
        print(f"wrote {n_images} JPEGs of {side}x{side} px to {root} in {time.perf_counter() - started:.0f} s", flush=True)
    return root


TABLE = "labels.csv"
TABLE_OVERRIDES = ["data=table", f"data.csv={TABLE}", "data.path_column=path", "data.label_column=label",
                   "data.label_values={NORMAL: [NORMAL], PNEUMONIA: [PNEUMONIA]}", "data.patient_column=patient",
                   "data.split_column=split", "data.split_values={train: [train], test: [test]}"]


def write_table(root: Path) -> None:
    """root/labels.csv: every image of the folder with its class, patient (one per image) and split."""
    import csv

    if (root / TABLE).is_file():
        return
    rows = [{"path": p.relative_to(root).as_posix(), "label": p.parent.name, "patient": p.stem, "split": p.parent.parent.name}
            for p in sorted(root.glob("*/*/*.jpeg"))]
    tmp = root / f".{TABLE}.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "patient", "split"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.rename(root / TABLE)


def peak_anon_sampler(peak: dict[str, int], stop: threading.Event) -> None:
    """Keeps peak["anon_kb"] at the largest RssAnon of this process seen every 20 ms."""
    while not stop.is_set():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                peak["anon_kb"] = max(peak["anon_kb"], int(line.split()[1]))
        stop.wait(0.02)


def measure(root: Path, cache: Path | None, image_size: int, out_dir: Path, table: bool = False) -> dict[str, float]:
    """One folder in this process: first decode into `cache` (none: in memory), then one epoch;
    with `table`, through data=table and the folder's labels.csv."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from xray_cls.data import ImageFolderDataModule
    from xray_cls.data.folder import list_images
    from xray_cls.runtime.configs import CONFIG_DIR
    from xray_cls.train import train

    peak, stop = {"anon_kb": 0}, threading.Event()
    sampler = threading.Thread(target=peak_anon_sampler, args=(peak, stop), daemon=True)
    sampler.start()
    figures: dict[str, float] = {}
    data_overrides = TABLE_OVERRIDES if table else ["data=folder"]
    if cache is not None:
        started = time.perf_counter()
        if table:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                data_cfg = compose("train", overrides=[*data_overrides, f"data.root={root}"]).data
            data = instantiate(data_cfg, image_size=image_size, cache_dir=str(cache))
        else:
            data = ImageFolderDataModule(root=str(root), image_size=image_size, cache_dir=str(cache))
        data.setup()
        figures["decode_ips"] = sum(len(s) for s in data.splits.values()) / (time.perf_counter() - started)
        del data
    overrides = [
        f"paths.output_dir={out_dir}", *data_overrides, f"data.root={root}", f"data.image_size={image_size}",
        f"data.cache_dir={cache if cache is not None else 'null'}", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "logger=csv", "bootstrap.resamples=0", "gradcam_samples=0",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    fit_seconds = train(cfg)["train_seconds"]
    stop.set()
    sampler.join()
    figures["s_per_1000"] = fit_seconds / len(list_images(root / "train")[0]) * 1000
    figures["peak_anon_mb"] = peak["anon_kb"] / 1024
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return figures


def measure_in_child(root: Path, cache: Path | None, image_size: int, out_dir: Path, table: bool = False) -> dict[str, float]:
    """`measure` in a fresh process, so that each size's memory figures are its own."""
    spec = json.dumps({"root": str(root), "cache": str(cache) if cache else None, "image_size": image_size, "out_dir": str(out_dir),
                       "table": table})
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {root} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny folders: a smoke test of every measurement")
    parser.add_argument("--sizes", help="comma-separated folder sizes (default 2000,10000,40000; quick 64,256)")
    parser.add_argument("--data", type=Path, help=f"where the synthetic folders are kept (default {DEFAULT_DATA})")
    parser.add_argument("--table", action="store_true", help="read the folders through data=table and a generated labels.csv")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        cache = Path(spec["cache"]) if spec["cache"] else None
        print(json.dumps(measure(Path(spec["root"]), cache, spec["image_size"], Path(spec["out_dir"]), spec["table"])))
        return

    sizes = sorted(int(s) for s in (args.sizes or ("64,256" if args.quick else "2000,10000,40000")).split(","))
    side, image_size = (96, 32) if args.quick else (512, 128)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = args.data or (work / "folders" if args.quick else DEFAULT_DATA)
        roots = {n: synthetic_folder(data_dir, n, side) for n in sizes}
        for root in roots.values() if args.table else []:
            write_table(root)
        smallest = sizes[0]
        # The time reference is measured before and after the mapped runs, and averaged: the
        # largest takes minutes, and a shared machine's speed drifts by more than the goal's margin.
        before = measure_in_child(roots[smallest], None, image_size, work / "run_in_memory_before", args.table)
        mapped = {n: measure_in_child(roots[n], work / f"cache_{n}", image_size, work / f"run_{n}", args.table) for n in sizes}
        after = measure_in_child(roots[smallest], None, image_size, work / "run_in_memory_after", args.table)
        in_memory = {k: (before[k] + after[k]) / 2 for k in before}
        print(f"in-memory reference: {before['s_per_1000']:.2f} s per 1,000 images before, {after['s_per_1000']:.2f} after")

    print()
    print(f"{side}x{side} px JPEGs{' through data=table' if args.table else ''}, data.image_size={image_size}, one epoch of the default CNN")
    print(f"{'images':>8} {'data':<10}{'decode (img/s)':>16}{'s / 1,000 img':>15}{'peak RssAnon MB':>17}{'peak RSS MB':>13}")
    rows = [(smallest, "in memory", in_memory)] + [(n, "mapped", mapped[n]) for n in sizes]
    for n, kind, fig in rows:
        decode = f"{fig['decode_ips']:.0f}" if "decode_ips" in fig else "-"
        print(f"{n:>8} {kind:<10}{decode:>16}{fig['s_per_1000']:>15.2f}{fig['peak_anon_mb']:>17.0f}{fig['peak_rss_mb']:>13.0f}")
    largest = mapped[sizes[-1]]
    anon_growth = largest["peak_anon_mb"] / mapped[smallest]["peak_anon_mb"]
    time_growth = largest["s_per_1000"] / in_memory["s_per_1000"]
    for name, value in (("peak RssAnon, largest / smallest", anon_growth), ("s per 1,000 images, largest mapped / smallest in memory", time_growth)):
        print(f"{name}: {value:.3f} (goal <= 1.2) {'PASS' if value <= 1.2 else 'FAIL'}")
    print(f"RESULT anon_growth={anon_growth:.3f} time_growth={time_growth:.3f} decode_ips={largest['decode_ips']:.0f}")


if __name__ == "__main__":
    main()
