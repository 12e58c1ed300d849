"""Entry points that the case server (fuzz_server.py) runs in its children:

- `read_data`: the first steps of `python -m xray_cls` on its data, exactly as the command takes
  them (options checked, the data read by `train.read_data` under the command's own error
  handling), then a summary of what was read instead of training on it: what the fuzzer needs of
  a reader, where a whole run would cost seconds a case;
- `interrupted_run`: `python -m xray_cls` that sends itself a real signal in a chosen phase.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

from hydra import compose, initialize_config_dir

from xray_cls.runtime.configs import CONFIG_DIR
from xray_cls.runtime.console import exit_on_user_error, quiet_libraries


def summary(datamodule: object) -> dict:
    """Per split: its image count, class counts, image size and a digest of its pixels and labels."""
    found = {"classes": list(datamodule.class_names)}
    for name, split in datamodule.splits.items():
        digest = hashlib.sha256()
        for images in split.batches(256):
            digest.update(images.contiguous().numpy().tobytes())
        digest.update(split.labels.numpy().tobytes())
        found[name] = {"images": len(split), "counts": split.class_counts(len(datamodule.class_names)),
                       "size": list(split.source.shape[1:]), "digest": digest.hexdigest()[:16]}
    return found


def read_data() -> None:
    """`python -m case_entries:read_data OVERRIDES...`: prints the summary as one JSON line."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=sys.argv[1:])

    def read() -> None:
        from xray_cls.train import check_run_options
        from xray_cls.train import read_data as read_like_a_run

        check_run_options(cfg)
        quiet_libraries()
        print(json.dumps(summary(read_like_a_run(cfg))), flush=True)

    exit_on_user_error(read)


def stop_here() -> None:
    """Send the signal the test asked for (XRAY_CLS_TEST_SIGNAL), once, to this process's group, as
    a terminal's Ctrl+C reaches a command and its DataLoader workers."""
    signum = int(os.environ.pop("XRAY_CLS_TEST_SIGNAL", "0"))
    if signum:
        os.killpg(os.getpgrp(), signum)


def interrupted_run() -> None:
    """`python -m xray_cls OVERRIDES...` that signals itself in the phase XRAY_CLS_TEST_PHASE:
    fit (its second training batch), last validation (the last epoch's validation, after its last
    training batch), choices (once the val choices are in best.ckpt, before last.ckpt), test (its
    second test batch), report (while the first figure is being written)."""
    from matplotlib.figure import Figure

    from xray_cls import train
    from xray_cls.metrics.val_choices import ValChoices
    from xray_cls.models.classifier import XrayClassifier

    phase = os.environ["XRAY_CLS_TEST_PHASE"]

    def after(cls: type, name: str, when: object = None) -> None:
        original = getattr(cls, name)

        def wrapped(self: object, *args: object, **kwargs: object) -> object:
            result = original(self, *args, **kwargs)
            if when is None or when(self, *args):
                stop_here()
            return result

        setattr(cls, name, wrapped)

    if phase == "fit":
        after(XrayClassifier, "training_step", lambda module, batch, index: index == 1)
    elif phase == "last validation":
        after(XrayClassifier, "validation_step", lambda module, batch, index: not module.trainer.sanity_checking
              and module.current_epoch == module.trainer.max_epochs - 1)
    elif phase == "choices":
        after(ValChoices, "record_in")
    elif phase == "test":
        after(XrayClassifier, "test_step", lambda module, batch, index: index == 1)
    elif phase == "report":
        after(Figure, "savefig")
    else:
        raise ValueError(phase)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    train.main()
