"""The package's plan, as its imports draw it (scripts/layers.py): no import runs back up a layer,
none closes a circle, no module is over about 300 lines, and docs/development.md shows today's picture."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def layers():
    spec = importlib.util.spec_from_file_location("layers", ROOT / "scripts" / "layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_runs_back_up_or_closes_a_circle(layers) -> None:
    edges = layers.graph()
    assert len(edges) > 60 and sum(map(len, edges.values())) > 150  # the imports were read
    assert layers.back_up(edges) == []
    assert layers.circles(edges) == []


def test_the_checks_see_an_import_back_up_and_a_circle(layers) -> None:
    """The checks can fail: a core module importing a command, and two modules importing each other."""
    edges = {m: set(t) for m, t in layers.graph().items()}
    edges["xray_cls.core.errors"].add("xray_cls.train")
    assert layers.back_up(edges) == ["xray_cls.core.errors -> xray_cls.train"]
    assert ["xray_cls.core.errors", "xray_cls.train"] in [sorted(set(g) & {"xray_cls.core.errors", "xray_cls.train"}) for g in layers.circles(edges)]


def test_no_module_is_over_about_300_lines(layers) -> None:
    assert layers.too_long() == []


def test_the_docs_show_todays_picture(layers) -> None:
    docs = (ROOT / "docs" / "development.md").read_text()
    assert layers.with_picture(docs, layers.picture(layers.graph())) == docs, "run: python scripts/layers.py --write docs/development.md"


def test_every_folder_says_what_it_may_import() -> None:
    for folder in sorted(p for p in (ROOT / "xray_cls").iterdir() if (p / "__init__.py").is_file()):
        doc = (folder / "__init__.py").read_text()
        assert doc.startswith('"""Layer ') and ("May import" in doc or "Imports no other" in doc), folder.name


def test_an_import_of_the_flat_layout_still_works_or_says_where_it_went() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from xray_cls.checkpoint import load_classifier  # noqa: F401  the flat layout's name
    from xray_cls.models.checkpoints import load_classifier as today

    assert load_classifier is today
    assert any("xray_cls.checkpoint is now xray_cls.models.checkpoints" in str(w.message) for w in caught)
    result = subprocess.run([sys.executable, "-c", "import xray_cls.config"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "ImportError: xray_cls.config was split in the layer folders: its names are in xray_cls.core.options" in result.stderr


def test_an_old_checkpoints_network_name_is_todays(tmp_path: Path) -> None:
    """Checkpoints written before the folders name xray_cls.networks.MLP: they load, and resume, as today's."""
    from xray_cls.models.networks import MLP, build_network, canonical_config

    net = build_network({"_target_": "xray_cls.networks.MLP", "in_channels": 1, "image_size": 4, "hidden": [], "dropout": 0})
    assert isinstance(net, MLP)
    assert canonical_config({"_target_": "xray_cls.backbones.TorchvisionNet"}) == {"_target_": "xray_cls.models.backbones.TorchvisionNet"}
