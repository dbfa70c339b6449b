"""Image reading under bad input, tried systematically (hypothesis): load_rgb over random, cut and flipped bytes of
every format PIL writes and over valid images of every mode (grey-scale JPEG included), and ImageFolder trees with
empty class folders, stray files and corrupt images. Every case gives an RGB image, a ValueError naming the file or
folder, or a logged count of what was left out; docs/reliability.md lists the cases and what each gives."""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from polyformer.domains.vision.data import ImageFolderDataModule, load_rgb

# deterministic runs of a stated size: the counts in docs/reliability.md are these max_examples
BAD_INPUT = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# (format, modes it writes); "1" is bilevel, "P" palette, "I;16" 16-bit grey
FORMATS = {"JPEG": ["RGB", "L", "CMYK"], "PNG": ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"],
           "GIF": ["P", "L"], "BMP": ["RGB", "L", "1"], "TIFF": ["RGB", "L", "CMYK", "RGBA"], "WEBP": ["RGB", "RGBA"]}
MAGIC = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


@st.composite
def encoded_image(draw) -> tuple[bytes, str, np.ndarray]:
    """(file bytes, PIL mode, the pixels written)."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    width, height = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    bands = len(Image.new(mode, (1, 1)).getbands())
    seed = draw(st.integers(0, 2**16))
    high = 65535 if mode == "I;16" else 2 if mode == "1" else 256
    pixels = np.random.default_rng(seed).integers(0, high, (height, width, bands)).astype(np.uint16)
    if mode == "I;16":
        image = Image.frombytes(mode, (width, height), pixels[..., 0].astype("<u2").tobytes())
    elif mode == "1":
        image = Image.fromarray(pixels[..., 0].astype(bool))
    else:
        image = Image.frombytes(mode, (width, height), pixels.astype(np.uint8).tobytes())
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue(), mode, pixels


def write(folder: Path, data: bytes, suffix: str = ".jpg") -> Path:
    path = Path(tempfile.mkdtemp(dir=folder)) / f"image{suffix}"
    path.write_bytes(data)
    return path


@pytest.fixture
def small_bomb_limit(monkeypatch):
    # a flipped header byte can declare a huge image: PIL refuses above 2 × MAX_IMAGE_PIXELS, and below that would
    # allocate it; a lower limit keeps those cases small and fast
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)


def check_rgb_or_error_naming_the_file(path: Path) -> None:
    try:
        image = load_rgb(str(path))
    except ValueError as error:
        assert str(path) in str(error), str(error)
    else:
        assert image.mode == "RGB" and min(image.size) >= 1


@settings(max_examples=60, **BAD_INPUT)
@given(image=encoded_image())
def test_every_mode_and_format_loads_as_rgb_and_grey_stays_grey(tmp_path, image):
    data, mode, pixels = image
    rgb = load_rgb(str(write(tmp_path, data)))
    assert rgb.mode == "RGB" and rgb.size == (pixels.shape[1], pixels.shape[0])
    if mode in ("L", "I;16", "1"):  # a grey-scale image becomes three equal channels
        array = np.asarray(rgb)
        assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()


@pytest.mark.parametrize("damage", ["random", "magic_then_random", "cut", "flipped"])
@settings(max_examples=60, **BAD_INPUT)
@given(data=st.data())
def test_damaged_bytes_give_rgb_or_an_error_naming_the_file(tmp_path, small_bomb_limit, damage, data):
    if damage == "random":
        content = data.draw(st.binary(max_size=3000))
    elif damage == "magic_then_random":
        content = data.draw(st.sampled_from(MAGIC)) + data.draw(st.binary(max_size=3000))
    else:
        content = data.draw(encoded_image())[0]
        if damage == "cut":
            content = content[: data.draw(st.integers(0, len(content) - 1))]
        else:
            flipped = bytearray(content)
            for position in data.draw(st.lists(st.integers(0, len(flipped) - 1), min_size=1, max_size=12)):
                flipped[position] ^= data.draw(st.integers(1, 255))
            content = bytes(flipped)
    check_rgb_or_error_naming_the_file(write(tmp_path, content, data.draw(st.sampled_from([".jpg", ".png"]))))


def test_a_huge_declared_image_is_an_error_naming_the_file(tmp_path, small_bomb_limit):
    path = tmp_path / "huge.png"
    Image.new("L", (1500, 1500)).save(path)  # 2.25 M pixels: above 2 × the lowered limit
    with pytest.raises(ValueError, match=rf"cannot read image file {path}: Image size \(2250000 pixels\) exceeds"):
        load_rgb(str(path))


@st.composite
def image_tree(draw, tmp_path: Path) -> tuple[Path, dict]:
    """root/{train,val}/<class>/ with 0-3 images, 0-2 stray files and 0-1 corrupt images per class folder."""
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    classes = [f"class{i}" for i in range(draw(st.integers(1, 3)))]
    tree = {}
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        split_classes = classes if draw(st.integers(0, 9)) else classes[:-1]  # sometimes a class is missing
        for name in split_classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            good, stray, corrupt = draw(st.integers(0, 3)), draw(st.integers(0, 2)), draw(st.integers(0, 1))
            for i in range(good):
                (folder / f"{i}.jpg").write_bytes(draw(encoded_image())[0])
            for i in range(stray):
                (folder / draw(st.sampled_from([f"notes{i}.txt", f".DS_Store{i}", f"{i}.jpg.bak", f"{i}"]))).touch()
            for i in range(corrupt):
                (folder / f"broken{i}.png").write_bytes(draw(st.binary(max_size=200)))
            tree[split, name] = (good, stray, corrupt)
    return root, tree


@settings(max_examples=40, **BAD_INPUT)
@given(data=st.data())
def test_image_folder_tree_loads_every_image_or_names_the_folder_or_file(tmp_path, caplog, data):
    root, tree = data.draw(image_tree(tmp_path))
    module = ImageFolderDataModule(root=str(root), img_size=8, batch_size=2, num_workers=0)
    caplog.clear()
    classes = {split: sorted(name for (s, name) in tree if s == split) for split in ("train", "val")}
    expected = None  # what the error must name: the first split without classes or with an empty class folder
    for split, names in classes.items():
        empty = [name for name in names if sum(tree[split, name]) - tree[split, name][1] == 0]
        if not names or empty:
            expected = [f"at {root / split}:", empty[0] if empty else "Couldn't find any class folder"]
            break
    if expected is None and classes["val"] != classes["train"]:
        expected = ["val classes differ from train classes"]
    try:
        with caplog.at_level(logging.WARNING, logger="polyformer.domains.vision.data"):
            module.setup("fit")
    except ValueError as error:
        assert expected is not None and all(part in str(error) for part in expected), (expected, str(error))
        return
    assert expected is None
    for split in ("train", "val"):
        dataset = module.splits[split]
        assert len(dataset) == sum(g + c for (s, _), (g, _, c) in tree.items() if s == split)  # nothing dropped
        stray = sum(n for (s, _), (_, n, _) in tree.items() if s == split)
        assert (f"left out {stray} files without an image extension" in caplog.text) == (stray > 0), caplog.text
        for i, (path, _) in enumerate(dataset.samples):
            if Path(path).name.startswith("broken"):
                with pytest.raises(ValueError, match="cannot read image file"):
                    dataset[i]
            else:
                assert dataset[i][0].shape == (3, 8, 8)
