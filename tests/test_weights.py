"""The committed weights: each file under weights/ is listed in weights/README.md with its sha256, and loads
weights-only (hyper-parameters + state dict, no optimizer or loop state)."""

import hashlib
import re
from pathlib import Path

import pytest
import torch

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
FILES = sorted(WEIGHTS.rglob("*.ckpt"))
LISTED = dict(re.findall(r"^\| `([^`]+\.ckpt)` \|.*?\| `([0-9a-f]{64})` \|", (WEIGHTS / "README.md").read_text(),
                         flags=re.MULTILINE))


def test_every_listed_file_exists():
    assert FILES, f"no .ckpt files under {WEIGHTS}"
    missing = sorted(set(LISTED) - {str(path.relative_to(WEIGHTS)) for path in FILES})
    assert not missing, f"weights/README.md lists files that are not there: {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda path: str(path.relative_to(WEIGHTS)))
def test_weights_are_listed_with_their_sha256_and_load_weights_only(path):
    name = str(path.relative_to(WEIGHTS))
    assert name in LISTED, f"{name} is not listed (with its sha256) in weights/README.md"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LISTED[name], f"{name}: sha256 differs from the README's"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint) >= {"state_dict", "hyper_parameters"}, f"{name}: keys {sorted(checkpoint)}"
    assert not set(checkpoint) & {"optimizer_states", "loops", "lr_schedulers"}, f"{name}: training state kept"
    assert all(tensor.dtype == torch.float32 for tensor in checkpoint["state_dict"].values()
               if tensor.is_floating_point()), f"{name}: not fp32"
    assert path.stat().st_size <= 25 * 2**20, f"{name}: over 25 MB"


@pytest.mark.parametrize("path", FILES, ids=lambda path: str(path.relative_to(WEIGHTS)))
def test_weights_rebuild_the_task_they_record(path):
    """Every committed file rebuilds its task (the class `polyformer fit` recorded, its hyper-parameters through
    from_plain) and loads strictly: what `polyformer test --ckpt_path` and `polyformer export` do."""
    from polyformer.checkpoint import load_checkpoint, task_class

    cls = task_class(load_checkpoint(path), source=str(path))
    task = cls.load_from_checkpoint(path)
    assert type(task) is cls and sum(p.numel() for p in task.parameters()) > 0


def test_moved_detection_class_paths_load_with_a_deprecation_message():
    """The detection weights record polyformer.domains.vision.detection_task.<Class> (the module before the
    vision/detection/ subpackage): the old path still names the same class, with a DeprecationWarning."""
    import importlib
    import sys

    from polyformer.checkpoint import import_class
    from polyformer.domains.vision.detection import DeformableDetectionTask, DetectionTask, VOCDetectionDataModule

    for module in ("polyformer.domains.vision.detection_task", "polyformer.domains.vision.detection_data"):
        sys.modules.pop(module, None)  # the warning is given on import
    with pytest.warns(DeprecationWarning, match="polyformer.domains.vision.detection_task is deprecated"):
        assert import_class("polyformer.domains.vision.detection_task.DetectionTask") is DetectionTask
    assert import_class("polyformer.domains.vision.detection_task.DeformableDetectionTask") is DeformableDetectionTask
    with pytest.warns(DeprecationWarning, match="detection_data is deprecated"):
        module = importlib.import_module("polyformer.domains.vision.detection_data")
    assert module.VOCDetectionDataModule is VOCDetectionDataModule
