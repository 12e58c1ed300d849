"""`python -m xray_cls.predict ckpt=... input=IMAGE_OR_FOLDER [gradcam=true] [tta=true]`: a trained model on new images.

`ckpt=[a.ckpt,b.ckpt]` and `tta=true` average probabilities as `evaluate` does (xray_cls.evaluation.ensemble);
their threshold is `threshold=` (the one `evaluate` chose on val for the same average), else the
first checkpoint's, with a warning.

Writes predictions.csv (path, probability of the positive class, `probability_pneumonia` for
task=pneumonia, the label at the run's threshold; for three or more classes one probability
column per class and the most probable class) to its output folder (`outputs/predict/<date>/<time>/`), and with gradcam=true one overlay PNG per image
under gradcam/, mirroring the input folder. A folder is searched recursively; files that are not
images are skipped and counted. Unreadable images are named in the log, one line each; the others
are predicted and written, and then the command fails (exit status 2), so that a script notices.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from xray_cls.core.errors import UserInputError
from xray_cls.core.files import atomic_write, path_text, write_csv
from xray_cls.core.legacy_names import forwarding
from xray_cls.core.options import number
from xray_cls.data.inputs import InputFiles, find_inputs, read_chunk
from xray_cls.runtime.configs import CONFIG_DIR
from xray_cls.runtime.console import checkpoint_command, exit_on_user_error

log = logging.getLogger(__name__)

OPTIONS = [number("batch_size", 1, integer=True), number("threshold", 0, 1, none=True)]  # checked before anything is read


# gradcam: the overlay's path relative to the CSV's folder, so that the folder can be moved whole.
def csv_columns(names: list[str]) -> list[str]:
    if len(names) > 2:
        return ["path", *probability_columns(names), "predicted_label", "gradcam"]
    return ["path", probability_column(names), "predicted_label", "threshold", "gradcam"]


def probability_column(names: list[str], name: str | None = None) -> str:
    """probability_<the positive class, or `name`>, in lower case and word characters: probability_pneumonia."""
    return "probability_" + re.sub(r"\W+", "_", (name or names[-1]).lower()).strip("_")


def probability_columns(names: list[str]) -> list[str]:
    """One column per class; classes that would share a column name get their label number."""
    columns = [probability_column(names, n) for n in names]
    return [c if columns.count(c) == 1 else f"{c}_{i}" for i, c in enumerate(columns)]


OVERLAY_SIDE = (224, 512)  # overlays are drawn with the longer side in this range
PREDICT_BATCH_BYTES = 2**28


def display_image(path: Path, geometry: str) -> Any:
    """The image the model saw (the centred square when cropped), in grayscale at its own
    resolution, resized for an overlay: longer side within OVERLAY_SIDE."""
    import numpy as np
    from PIL import Image

    from xray_cls.data import center_square, open_gray

    gray = open_gray(path, OVERLAY_SIDE[1])
    if geometry == "crop":
        gray = gray.crop(center_square(*gray.size))
    longer = max(gray.size)
    scale = min(max(longer, OVERLAY_SIDE[0]), OVERLAY_SIDE[1]) / longer
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    return np.asarray(gray.resize(size, Image.Resampling.BILINEAR))


def save_overlay(path: Path, cam: Any, geometry: str, target: Path) -> None:
    from xray_cls.reports.gradcam import overlay

    with atomic_write(target) as tmp:
        overlay(display_image(path, geometry), cam).save(tmp, format="PNG")


def predict(cfg: DictConfig) -> Path:
    """Predict every image of `cfg.input`; returns the path of predictions.csv."""
    with checkpoint_command(cfg, OPTIONS, ["predictions.csv"], "predictions",
                            required={"input": "/path/to/image_or_folder"}) as out_dir:
        module, threshold = predicting_model(cfg)
        input_path = Path(cfg.input).expanduser()
        found = find_inputs(input_path)
        rows = predicted_rows(cfg, module, threshold, found, input_path, out_dir)
        return write_predictions(cfg, rows, found, input_path, out_dir, threshold, module.hparams.preprocessing["class_names"])


def predicting_model(cfg: DictConfig) -> tuple[Any, float]:
    """The checkpoint's classifier (or the average of several, or over TTA views) and its threshold."""
    from xray_cls.evaluation.ensemble import checkpoint_paths, load_averaged
    from xray_cls.reports.gradcam import last_conv_layer

    ckpts = checkpoint_paths(cfg.ckpt)
    averaged = len(ckpts) > 1 or bool(cfg.tta)
    if cfg.gradcam and averaged:
        raise UserInputError("gradcam=true explains one network; it cannot be combined with a list of checkpoints or tta=true")
    module = load_averaged(ckpts, bool(cfg.tta))
    if cfg.gradcam and last_conv_layer(module.net) is None:
        raise UserInputError(
            f"gradcam=true needs a network with convolution layers; the {type(module.net).__name__} of "
            f"ckpt={cfg.ckpt} has none (train model=cnn or model=resnet, or leave gradcam=false)"
        )
    if not module.binary and cfg.threshold is not None:
        raise UserInputError(f"threshold={cfg.threshold} applies to two classes; this model tells {module.num_classes} apart "
                             "and calls each image its most probable class: expected threshold=null")
    threshold = float(cfg.threshold) if cfg.threshold is not None else module.choices.threshold
    if averaged and cfg.threshold is None and module.binary:
        log.warning(
            "threshold %.4f is the one ckpt=%s chose for itself; for the averaged probabilities pass the threshold "
            "that `python -m xray_cls.evaluate` chooses on val for the same ckpt and tta (threshold=...)", threshold, ckpts[0],
        )
    return module, threshold


def predicted_rows(cfg: DictConfig, module: Any, threshold: float, found: InputFiles, input_path: Path, out_dir: Path) -> list[dict[str, Any]]:
    """One CSV row per readable image, read and predicted a batch at a time (with its overlay for gradcam=true)."""
    from xray_cls.data import normalize, trained_geometry
    from xray_cls.reports.gradcam import grad_cam

    prep = module.hparams.preprocessing
    names, column = prep["class_names"], probability_column(prep["class_names"])
    columns = probability_columns(names)  # three or more classes: one a class
    geometry = trained_geometry(prep, cfg.ckpt)
    root = input_path if input_path.is_dir() else input_path.parent
    # At most about PREDICT_BATCH_BYTES of float pixels at a time, whatever the image size.
    batch_size = min(cfg.batch_size, max(1, PREDICT_BATCH_BYTES // (4 * prep["in_channels"] * prep["image_size"] ** 2)))
    rows: list[dict[str, Any]] = []
    for start in range(0, len(found.images), batch_size):
        paths, images = read_chunk(found.images[start : start + batch_size], prep["image_size"], geometry, found)
        if not paths:
            continue
        x = normalize(images, prep["mean"], prep["std"])
        probs = module.predict_probabilities(x)
        called = module.decisions(probs, threshold).tolist()
        cams = grad_cam(module.net, x).numpy() if cfg.gradcam else None
        for i, (path, prob) in enumerate(zip(paths, probs.tolist())):
            overlay_path = None
            if cams is not None:
                overlay_path = out_dir / "gradcam" / path.relative_to(root).with_name(path.name + ".png")  # a.jpeg and a.png both kept
                save_overlay(path, cams[i], geometry, overlay_path)
            if module.binary:
                shown = {column: f"{prob:.6f}", "threshold": f"{threshold:.6f}"}
            else:
                shown = {c: f"{p:.6f}" for c, p in zip(columns, prob)}
            rows.append({
                "path": path_text(path),
                **shown,
                "predicted_label": names[called[i]],
                "gradcam": path_text(overlay_path.relative_to(out_dir)) if overlay_path else "",  # beside the CSV
            })
    return rows


def write_predictions(cfg: DictConfig, rows: list[dict[str, Any]], found: InputFiles, input_path: Path, out_dir: Path,
                      threshold: float, names: list[str]) -> Path:
    """predictions.csv and the summary; then the command fails when some images could not be read
    (their results are written first)."""
    for _, reason in found.unreadable:
        log.warning("skipped: %s", reason)
    if not rows:
        if input_path.is_file():
            raise UserInputError(f"input={found.unreadable[0][1]}")
        raise UserInputError(f"input={input_path}: none of its {len(found.images)} image file(s) could be read")
    csv_path = out_dir / "predictions.csv"
    write_csv(csv_path, rows, csv_columns(names))
    if len(names) == 2:
        called = f"{sum(r['predicted_label'] == names[-1] for r in rows)} called {names[-1]} at threshold {threshold:.4f}"
    else:
        called = ", ".join(f"{sum(r['predicted_label'] == n for r in rows)} {n}" for n in names) + " (the most probable class)"
    print(
        f"predicted {len(rows)} image(s), {called}: {csv_path}\n"
        f"skipped {found.not_images} file(s) that are not images and {len(found.unreadable)} unreadable image(s)"
        + (f"; Grad-CAM overlays in {out_dir / 'gradcam'}" if cfg.gradcam else ""),
        flush=True,
    )
    if found.unreadable:
        raise UserInputError(
            f"input={input_path}: {len(found.unreadable)} of {len(found.images)} image file(s) could not be read "
            f"(each named above); the predictions of the other {len(rows)} are in {csv_path}"
        )
    return csv_path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: predict(cfg))



__getattr__ = forwarding(__name__)  # the names that moved out of this module, from where they are now

if __name__ == "__main__":
    main()
