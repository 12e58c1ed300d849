"""A finished run as a user sees it: TensorBoard serving its folder, asked over HTTP and shown in headless Chromium.

The screenshot test needs Chromium (Debian's `chromium` package, which .ci/run installs) and is
skipped without it. The HTTP API test needs only TensorBoard and always runs.

docs/tensorboard_scalars.png is made by this module's code path, on a default run:
    cd /tmp && python -m xray_cls model=mlp
    python tests/test_browser.py /tmp/outputs/<date>/<time> docs/tensorboard_scalars.png
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, local_server

pytestmark = pytest.mark.slow  # starts TensorBoard and headless Chromium

CURVE_TAGS = ["loss/train", "loss/val", "acc/train", "acc/val"]
IMAGE_TAGS = ["test/confusion_matrix"]
WINDOW = (1400, 900)
RUN_COLOR = (255, 112, 67)  # #ff7043
# The legacy scalars dashboard, unsmoothed, with the four train/val curves first. (#timeseries,
# TensorBoard 2.21's default tab, draws its cards lazily and shows none in a headless screenshot.
# "Ignore outliers" stays on: that setting lives in localStorage, not in the URL.)
TAG_FILTER = urllib.parse.quote("^(loss|acc)/(train|val)$", safe="")
SCALARS_PAGE = f"/#scalars&_smoothingWeight=0&tagFilter={TAG_FILTER}"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    # The charts are drawn after the page's XHRs for tags and scalars return; without a budget the
    # screenshot shows empty chart cards. Virtual time does not advance while fetches are pending.
    "--virtual-time-budget=10000",
]
SKIP_NO_CHROMIUM = "Chromium not found (/usr/bin/chromium); .ci/run installs Debian's chromium package"


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def poll_json(url: str, done: Callable[[Any], bool], timeout: float = 30) -> Any:
    """URL's JSON once done(it) holds, or as it is at the deadline: TensorBoard may list a run
    before it has read all of the run's event files."""
    deadline = time.monotonic() + timeout
    while not done(data := get_json(url)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return data


def event_runs(logdir: Path) -> set[str]:
    """TensorBoard's run names: the folders holding event files, relative to the logdir."""
    return {p.parent.relative_to(logdir).as_posix() for p in logdir.rglob("events.out.tfevents.*")}


@contextmanager
def tensorboard(logdir: Path, timeout: float = 60) -> Iterator[str]:
    """`tensorboard --logdir LOGDIR` on a free local port; yields its base URL once it lists the runs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    expected = event_runs(logdir)
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port)]
    with local_server(command, f"tensorboard listing the runs {expected}",
                      lambda: expected <= set(get_json(f"{url}/data/runs", timeout=5)), timeout):
        yield url


def screenshot(url: str, png: Path, size: tuple[int, int] = WINDOW, timeout: float = 90) -> None:
    """A PNG of URL as headless Chromium draws it, with a fresh profile."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError(SKIP_NO_CHROMIUM)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        env = {**os.environ, "HOME": profile, "XDG_CONFIG_HOME": profile, "XDG_CACHE_HOME": profile}
        result = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
             f"--screenshot={png}", url],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
    # Chromium exits 0 even when the page fails to load; it then writes no file.
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {url} (exit {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")


def screenshot_scalars(logdir: Path, png: Path, size: tuple[int, int] = WINDOW) -> None:
    """TensorBoard's scalars dashboard of LOGDIR as a PNG: what docs/tensorboard_scalars.png shows."""
    with tensorboard(logdir) as url:
        screenshot(url + SCALARS_PAGE, png, size)


def image_stats(png: Path) -> dict[str, Any]:
    """Format, size and content of a screenshot. A blank page has one color. curve_pixels counts
    pixels of the first run's color (#ff7043, first in TensorBoard's run palette; the header's
    orange is #f57c00) right of the sidebar and below the header: the drawn curves."""
    with Image.open(png) as image:
        image_format, size = image.format, image.size
        pixels = np.asarray(image.convert("RGB")).astype(int)
    charts = pixels[70:, 360:]
    return {
        "format": image_format,
        "size": size,
        "colors": len(np.unique(pixels.reshape(-1, 3), axis=0)),
        "std": float(pixels.std()),
        "curve_pixels": int((np.abs(charts - RUN_COLOR).sum(-1) < 60).sum()),
    }


def is_blank(stats: dict[str, Any]) -> bool:
    return stats["colors"] < 50 or stats["std"] < 10


@pytest.fixture(scope="module")
def finished_run(mlp_run: Path) -> Path:
    """A real, short run by the project's training entry point: tensorboard/, metrics.json, figures/."""
    return mlp_run


@pytest.fixture(scope="module")
def tensorboard_url(finished_run: Path) -> Iterator[str]:
    with tensorboard(finished_run) as url:
        yield url


def test_tensorboard_api_lists_the_curves_and_the_confusion_matrix(finished_run: Path, tensorboard_url: str) -> None:
    (run,) = event_runs(finished_run)  # "tensorboard": Lightning's TensorBoardLogger folder
    assert get_json(f"{tensorboard_url}/data/runs") == [run]

    scalar_tags = poll_json(f"{tensorboard_url}/data/plugin/scalars/tags",
                            lambda tags: set(CURVE_TAGS) <= set(tags.get(run, {})))[run]
    image_tags = poll_json(f"{tensorboard_url}/data/plugin/images/tags",
                           lambda tags: set(IMAGE_TAGS) <= set(tags.get(run, {})))[run]
    assert set(CURVE_TAGS) <= set(scalar_tags), sorted(scalar_tags)
    assert set(IMAGE_TAGS) <= set(image_tags), sorted(image_tags)
    assert image_tags["test/confusion_matrix"]["samples"] == 1

    # Each curve has one point an epoch, at increasing steps: [[wall_time, step, value], ...].
    epochs = json.loads((finished_run / "metrics.json").read_text())["epochs"]
    for tag in CURVE_TAGS:
        query = urllib.parse.urlencode({"run": run, "tag": tag})
        points = poll_json(f"{tensorboard_url}/data/plugin/scalars/scalars?{query}", lambda p: len(p) >= epochs)
        assert len(points) == epochs, (tag, points)
        steps = [step for _, step, _ in points]
        assert steps == sorted(set(steps)), (tag, steps)
        assert all(np.isfinite(value) for _, _, value in points), (tag, points)


def test_headless_chromium_screenshots_the_scalars_dashboard(tensorboard_url: str, tmp_path: Path) -> None:
    if find_chromium() is None:
        pytest.skip(SKIP_NO_CHROMIUM)
    png = tmp_path / "scalars.png"
    screenshot(tensorboard_url + SCALARS_PAGE, png)
    stats = image_stats(png)
    assert stats["format"] == "PNG" and stats["size"] == WINDOW, stats
    assert not is_blank(stats), stats
    # Four charts of two epochs each; an empty dashboard (charts not drawn yet) has none of these.
    assert stats["curve_pixels"] > 300, stats


def test_the_blank_check_rejects_a_blank_page(tmp_path: Path) -> None:
    if find_chromium() is None:
        pytest.skip(SKIP_NO_CHROMIUM)
    png = tmp_path / "blank.png"
    screenshot("about:blank", png)
    stats = image_stats(png)
    assert stats["format"] == "PNG" and stats["size"] == WINDOW, stats
    assert is_blank(stats) and stats["curve_pixels"] == 0, stats


if __name__ == "__main__":  # python tests/test_browser.py RUN_DIR OUT.png
    logdir, out = Path(sys.argv[1]), Path(sys.argv[2])
    screenshot_scalars(logdir, out)
    print(out, image_stats(out))
