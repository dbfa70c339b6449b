"""Vision data: the embedded digits split, Mixup/CutMix soft targets, ImageFolder (and its unreadable-file error),
and CIFAR's refusal to download unless asked."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from polyformer.domains.vision import CIFARDataModule, DigitsDataModule, ImageFolderDataModule, MixupConfig


def test_digits_split_is_seeded_stratified_and_disjoint():
    data = DigitsDataModule(val_fraction=0.1, test_fraction=0.2, split_seed=0)
    labels = __import__("sklearn.datasets", fromlist=["load_digits"]).load_digits().target.tolist()
    splits = data.split_indices(labels)
    sizes = {name: len(index) for name, index in splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] >= 0.2 * 1797
    assert not set(splits["test"]) & (set(splits["train"]) | set(splits["val"]))
    assert not set(splits["train"]) & set(splits["val"])
    assert splits == DigitsDataModule(split_seed=0).split_indices(labels)
    assert splits["test"] != DigitsDataModule(split_seed=1).split_indices(labels)["test"]
    test_counts = np.bincount([labels[i] for i in splits["test"]], minlength=10)
    assert test_counts.min() >= 35 and test_counts.max() <= 37  # stratified: ~36 images of every digit


def test_digits_batches_and_augmentation():
    data = DigitsDataModule(img_size=16, batch_size=8)
    data.setup("fit")
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (8, 1, 16, 16) and labels.dtype == torch.long
    assert images.min() >= -1.0 and images.max() <= 1.0
    train = data.splits["train"]
    torch.manual_seed(0)
    assert not torch.equal(train[0][0], train[0][0])  # a fresh random affine per access
    assert torch.equal(data.splits["test"][0][0], data.splits["test"][0][0])  # evaluation is not augmented


def test_mixup_gives_soft_targets_in_training_only():
    data = DigitsDataModule(batch_size=8, mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    original = batch[0].clone()  # timm's Mixup mixes in place
    data.trainer = SimpleNamespace(training=True)
    images, targets = data.on_after_batch_transfer(batch, 0)
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(-1), torch.ones(8))
    assert not torch.equal(images, original)
    data.trainer = SimpleNamespace(training=False)
    assert data.on_after_batch_transfer(batch, 0) is batch


def write_tree(root, broken: bool = False):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    if broken:
        (root / "train" / "dog" / "9_broken.png").write_bytes(b"not an image")


def test_image_folder_loads_with_timm_transforms(tmp_path):
    write_tree(tmp_path)
    data = ImageFolderDataModule(root=str(tmp_path), img_size=32, batch_size=4, num_workers=0)
    assert data.num_classes == 2
    data.setup("fit")
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and set(labels.tolist()) <= {0, 1}


def test_image_folder_names_an_unreadable_file(tmp_path):
    write_tree(tmp_path, broken=True)
    data = ImageFolderDataModule(root=str(tmp_path), img_size=32, batch_size=4, num_workers=0)
    data.setup("fit")
    train = data.splits["train"]
    broken = [i for i, (path, _) in enumerate(train.samples) if path.endswith("9_broken.png")][0]
    with pytest.raises(ValueError, match=r"cannot read image file .*dog/9_broken\.png"):
        train[broken]


def test_image_folder_missing_split_and_cifar_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected a folder of class folders at .*train"):
        ImageFolderDataModule(root=str(tmp_path / "nowhere")).setup("fit")
    data = CIFARDataModule(name="cifar10", root=str(tmp_path), download=False, num_workers=0)
    data.prepare_data()  # download: false fetches nothing
    assert not any(tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match=r"cifar10 not found under .*set download: true"):
        data.setup("fit")
