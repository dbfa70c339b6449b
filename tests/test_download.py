"""download: true, tested against a local HTTP server on 127.0.0.1 serving the shared data (never the internet):
checksums, atomic writes, archives unpacked in place, and what a user reads when the data is absent."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from polyformer.data import fetch, file_checksum, shared_data_dir
from polyformer.domains.rl.data import OfflineRLDataModule
from polyformer.domains.speech.data import LibriSpeechDataModule, SpeechLoaderConfig
from polyformer.domains.timeseries.data import CSVForecastDataModule
from polyformer.domains.vision.data import CIFARDataModule

SHARED = shared_data_dir()
ETT = SHARED / "ett" / "ETTh1.csv"
LIBRISPEECH_DEV = SHARED / "speech" / "librispeech-sample" / "LibriSpeech" / "dev"
MINARI = SHARED / "rl" / "minari"
MEDIUM = "polyformer/halfcheetah/medium-v0"


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"shared data not found at {path} (set POLYFORMER_DATA_DIR)")


def tar_gz(folder: Path, archive: Path, arcname: str) -> str:
    """Packs `folder` as `arcname` into archive; returns its "sha256:<hex>"."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=arcname)
    return f"sha256:{file_checksum(archive, 'sha256')}"


def test_fetch_checks_the_checksum_and_leaves_nothing_when_it_differs(tmp_path, serve_folder):
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "file.txt").write_bytes(b"polyformer\n")
    url = serve_folder(tmp_path / "served") + "/file.txt"
    good = hashlib.sha256(b"polyformer\n").hexdigest()
    assert fetch(url, tmp_path / "out" / "file.txt", f"sha256:{good}").read_bytes() == b"polyformer\n"
    assert file_checksum(tmp_path / "out" / "file.txt", "md5") == hashlib.md5(b"polyformer\n").hexdigest()
    with pytest.raises(ValueError, match=f"sha256 {good} does not match the expected 00ff; nothing was written"):
        fetch(url, tmp_path / "bad" / "file.txt", "sha256:00ff")
    assert list((tmp_path / "bad").iterdir()) == []  # no partial file either
    with pytest.raises(ConnectionError, match="missing.txt"):
        fetch(url.replace("file.txt", "missing.txt"), tmp_path / "bad" / "missing.txt", f"sha256:{good}")
    with pytest.raises(ValueError, match="expected '<kind>:<hex digest>'"):
        fetch(url, tmp_path / "bad" / "file.txt", good)


@needs(ETT)
def test_ett_download_checks_the_etdataset_checksum(tmp_path, serve_folder):
    base = serve_folder(ETT.parent)
    target = tmp_path / "ett" / "ETTh1.csv"
    data = CSVForecastDataModule(str(target), lookback=96, horizon=24, download=True, url=f"{base}/ETTh1.csv")
    data.prepare_data()  # the known git blob id of ETDataset's ETTh1.csv, on the served copy
    assert target.read_bytes() == ETT.read_bytes()
    data.setup("fit")
    assert data.num_channels == 7
    other = CSVForecastDataModule(str(tmp_path / "x" / "ETTh2.csv"), download=True, url=f"{base}/ETTh1.csv")
    with pytest.raises(ValueError, match="git-blob-sha1 a52c4925.* does not match the expected 6e376077"):
        other.prepare_data()  # ETTh1's bytes served under ETTh2's name
    with pytest.raises(ValueError, match="download knows the ETT files"):
        CSVForecastDataModule(str(tmp_path / "mine.csv"), download=True, url=f"{base}/ETTh1.csv").prepare_data()


def test_ett_absent_says_how_to_get_it(tmp_path):
    data = CSVForecastDataModule(str(tmp_path / "ETTm1.csv"))
    data.prepare_data()  # download: false fetches nothing
    with pytest.raises(FileNotFoundError, match=r"ETTm1.csv; set data.download: true to fetch it from the ETDataset"):
        data.setup("fit")


@needs(LIBRISPEECH_DEV)
def test_librispeech_download_unpacks_a_split_from_a_mirror(tmp_path, serve_folder):
    checksum = tar_gz(LIBRISPEECH_DEV, tmp_path / "mirror" / "dev.tar.gz", "LibriSpeech/dev")
    root = tmp_path / "corpus"
    data = LibriSpeechDataModule(root=str(root), train_splits=["dev"], val_splits=["dev"], test_splits=["dev"],
                                 download=True, mirror=serve_folder(tmp_path / "mirror"), checksums={"dev": checksum},
                                 loader=SpeechLoaderConfig(num_workers=0))
    data.prepare_data()
    assert sorted(p.name for p in root.iterdir()) == ["LibriSpeech"]  # the archive is gone once unpacked
    data.setup("test")
    assert len(data.test_sets[0]) == 80
    with pytest.raises(ValueError, match="split 'dev': no checksum known"):
        LibriSpeechDataModule(root=str(tmp_path / "other"), train_splits=["dev"], download=True,
                              mirror=serve_folder(tmp_path / "mirror")).prepare_data()


def test_librispeech_download_checks_openslr_checksums(tmp_path, serve_folder):
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "dev-clean.tar.gz").write_bytes(b"not the real archive")
    data = LibriSpeechDataModule(root=str(tmp_path / "corpus"), train_splits=["dev-clean"], download=True,
                                 mirror=serve_folder(tmp_path / "mirror"))
    with pytest.raises(ValueError, match="sha256 .* does not match the expected 76f87d09"):
        data.prepare_data()
    assert list((tmp_path / "corpus").iterdir()) == []


def test_librispeech_absent_says_how_to_get_it(tmp_path):
    data = LibriSpeechDataModule(root=str(tmp_path), test_splits=["test-clean"],
                                 loader=SpeechLoaderConfig(num_workers=0))
    with pytest.raises(FileNotFoundError, match="found none; set data.download: true to fetch it .*test-clean.tar.gz"):
        data.setup("test")


@needs(MINARI / MEDIUM)
def test_minari_download_unpacks_a_dataset_archive(tmp_path, serve_folder):
    checksum = tar_gz(MINARI / MEDIUM, tmp_path / "mirror" / "medium.tar.gz", MEDIUM)
    root = tmp_path / "minari"
    data = OfflineRLDataModule(dataset=MEDIUM, root=str(root), download=True,
                               url=serve_folder(tmp_path / "mirror") + "/medium.tar.gz", checksum=checksum)
    data.setup("fit")
    assert len(data.train_episodes) == 100 and not (root / "medium.tar.gz").exists()
    with pytest.raises(ValueError, match="without a checksum"):
        OfflineRLDataModule(dataset=MEDIUM, root=str(tmp_path / "other"), download=True,
                            url=serve_folder(tmp_path / "mirror") + "/medium.tar.gz").setup("fit")


def test_minari_absent_says_how_to_get_it(tmp_path):
    data = OfflineRLDataModule(dataset=MEDIUM, root=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="download: true to fetch it from Minari's remote or from url"):
        data.setup("fit")
    assert not (tmp_path / "none").exists()


def fake_cifar10(folder: Path, monkeypatch) -> None:
    """A CIFAR-10-format archive of 20 + 10 random images, with torchvision's md5 table pointed at it."""
    from torchvision.datasets import CIFAR10

    rng = np.random.default_rng(0)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)

    def write(name: str, n: int) -> tuple[str, str]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(10)) * (n // 10)}
        (batches / name).write_bytes(pickle.dumps(entry))
        return name, file_checksum(batches / name, "md5")

    train_list = [write("data_batch_1", 20)]
    test_list = [write("test_batch", 10)]
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    meta_md5 = file_checksum(batches / "batches.meta", "md5")
    with tarfile.open(folder / CIFAR10.filename, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    shutil.rmtree(batches)
    monkeypatch.setattr(CIFAR10, "train_list", [list(e) for e in train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [list(e) for e in test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})


def test_cifar_download_from_a_mirror_checks_torchvisions_md5(tmp_path, serve_folder, monkeypatch):
    from torchvision.datasets import CIFAR10

    fake_cifar10(tmp_path / "mirror", monkeypatch)
    url = f"{serve_folder(tmp_path / 'mirror')}/{CIFAR10.filename}"
    data = CIFARDataModule(root=str(tmp_path / "cifar"), download=True, url=url, val_size=5, num_workers=0)
    with pytest.raises(ValueError, match=f"does not match the expected {CIFAR10.tgz_md5}"):
        data.prepare_data()  # the fake archive is not torchvision's
    monkeypatch.setattr(CIFAR10, "tgz_md5", file_checksum(tmp_path / "mirror" / CIFAR10.filename, "md5"))
    data.prepare_data()
    data.setup("fit")
    assert len(data.splits["train"]) + len(data.splits["val"]) == 20 and len(data.splits["test"]) == 10
