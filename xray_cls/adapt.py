"""`python -m xray_cls.adapt ckpt=... data.root=<site images> [method=bn]`: a model adapted to another site's images.

Reads the site's images (one file, or a folder searched recursively, as `predict` reads; labels are
never read), adapts a copy of the checkpoint's model to them (`method=bn`: batch-norm statistics;
`normalization`: the site's pixel mean and std; see xray_cls.evaluation.site) and writes `adapted.ckpt` to its
output folder (`outputs/adapt/<date>/<time>/`), with its provenance: the source checkpoint, the
number of images and a digest of their file list. `evaluate` and `predict` take it like any checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from torch import Tensor

from xray_cls.core.options import choice, number
from xray_cls.evaluation.options import ADAPTATIONS
from xray_cls.runtime.configs import CONFIG_DIR
from xray_cls.runtime.console import checkpoint_command, exit_on_user_error

log = logging.getLogger(__name__)

OPTIONS = [choice("method", ADAPTATIONS), number("batch_size", 1, integer=True)]  # checked before anything is read


def adapt(cfg: DictConfig) -> Path:
    """Adapt `cfg.ckpt` to the images of `cfg.data.root`; returns adapted.ckpt's path."""
    from xray_cls.core.checkpoint_files import write_checkpoint
    from xray_cls.data.inputs import find_inputs
    from xray_cls.evaluation.site import adapted_module, check_adaptable, checkpoint_with, files_digest
    from xray_cls.models.checkpoints import load_classifier, read_checkpoint

    with checkpoint_command(cfg, OPTIONS, ["adapted.ckpt"], "an adapted checkpoint",
                            required={"data.root": "/path/to/site_images"}) as out_dir:
        module = load_classifier(cfg.ckpt)
        check_adaptable(module.net, cfg.method, f"ckpt={cfg.ckpt}")
        found = find_inputs(Path(cfg.data.root).expanduser())
        adapted, count = adapted_module(module, cfg.method, site_images(module, found, cfg.batch_size))
        for _, reason in found.unreadable:
            log.warning("skipped: %s", reason)
        readable = sorted(set(found.images) - {path for path, _ in found.unreadable})
        record = {"method": cfg.method, "source": str(cfg.ckpt), "images": count, "skipped": len(found.unreadable),
                  "files_digest": files_digest(readable), "folder": str(cfg.data.root)}
        path = out_dir / "adapted.ckpt"
        write_checkpoint(path, checkpoint_with(read_checkpoint(cfg.ckpt), adapted, "adaptation", record))
    print(f"adapted {cfg.ckpt} ({cfg.method}) to {count} image(s) of {cfg.data.root}: {path}"
          + (f"; skipped {len(found.unreadable)} unreadable image(s), named above" if found.unreadable else ""), flush=True)
    return path


def site_images(module: Any, found: Any, batch_size: int) -> Iterator[Tensor]:
    """The readable images as the checkpoint's model reads them, uint8 (n, 1, size, size) a batch at a time."""
    from xray_cls.data import trained_geometry
    from xray_cls.data.inputs import read_chunk

    prep = module.hparams.preprocessing
    geometry = trained_geometry(prep, "the checkpoint")
    for start in range(0, len(found.images), batch_size):
        paths, images = read_chunk(found.images[start : start + batch_size], prep["image_size"], geometry, found)
        if paths:
            yield images


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="adapt")
def main(cfg: DictConfig) -> Any:
    return exit_on_user_error(lambda: adapt(cfg))


if __name__ == "__main__":
    main()
