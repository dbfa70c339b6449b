"""Forecasting data: ETT-format tables (a date column plus numeric channels) cut into (lookback, horizon) windows.

Splits follow the PatchTST / Time-Series-Library code (`data_provider/data_loader.py`):
- ETTh*: 12 / 4 / 4 months of hourly rows: train [0, 8640), val [8640 − L, 11520), test [11520 − L, 14400);
- ETTm*: the same months in 15-minute rows (× 4);
- any other table: 70 / 10 / 20 % chronologically, val and test starting L rows early so their first window's
  lookback lies in the previous split.
The scaler (per-channel mean and std) is fitted on the train rows only; every metric is on the scaled values.
Windows: x = rows [i, i + L), y = rows [i + L, i + L + H) of a split, for every i (the test loader drops nothing).

Bad tables (unreadable or ragged CSV, missing values, non-numeric or infinite cells, unparseable / unsorted /
duplicated timestamps, values too large to standardise, too few rows) raise a ValueError naming the file, column and
row, unless `fill` opts in to forward-filling or interpolating missing values.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from polyformer.data import SplitDataModule, fetch, make_loader

Features = Literal["M", "S"]  # M: every channel in, every channel out; S: the target channel only
SplitKind = Literal["auto", "etth", "ettm", "ratio"]
FillPolicy = Literal["error", "ffill", "interpolate"]
SPLITS = ("train", "val", "test")
HOURS_PER_MONTH = 30 * 24


def split_borders(rows: int, lookback: int, kind: Literal["etth", "ettm", "ratio"]) -> dict[str, tuple[int, int]]:
    """[start, end) row ranges of train / val / test; val and test start `lookback` rows early (TSLib's borders)."""
    if kind in ("etth", "ettm"):
        month = HOURS_PER_MONTH * (4 if kind == "ettm" else 1)
        train, val, test = 12 * month, 16 * month, 20 * month
        if rows < test:
            raise ValueError(f"the {kind} split needs at least {test} rows (12/4/4 months), found {rows}; "
                             f"set split: ratio for a shorter file")
    else:
        train, num_test = int(rows * 0.7), int(rows * 0.2)
        val, test = rows - num_test, rows
    return {"train": (0, train), "val": (train - lookback, val), "test": (val - lookback, test)}


def resolve_split(kind: SplitKind, name: str) -> Literal["etth", "ettm", "ratio"]:
    """'auto' picks the ETT protocol from the file name (ETTh1.csv → etth), as TSLib does, else 70/10/20."""
    if kind != "auto":
        return kind
    stem = Path(name).stem.lower()
    return "etth" if stem.startswith("etth") else "ettm" if stem.startswith("ettm") else "ratio"


def read_table(path: Path) -> pd.DataFrame:
    """The CSV file as a table of its header's columns; a row with more fields than the header is an error (pandas
    would otherwise silently take the extra leading field for an index, or drop the trailing ones)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, index_col=False)
    except pd.errors.ParserWarning:
        with open(path, newline="") as file:
            rows = csv.reader(file)
            header = next(rows)
            for row in rows:
                if len(row) > len(header):
                    raise ValueError(f"{path}: line {rows.line_num}: expected {len(header)} fields as in the header, "
                                     f"found {len(row)}") from None
        raise ValueError(f"{path}: expected {len(header)} fields per row as in the header, found a longer "
                         f"row") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: expected a CSV table with a header row, found an empty file") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: expected UTF-8 text, found byte {error.object[error.start]:#04x} at offset "
                         f"{error.start}") from None
    except pd.errors.ParserError as error:
        raise ValueError(f"{path}: expected a well-formed CSV table, found: {error}".rstrip()) from None


def validate_frame(frame: pd.DataFrame, *, date_column: str | None, fill: FillPolicy, source: str) -> pd.DataFrame:
    """Checks timestamps and values; returns the numeric channels (float64), rows in file order.

    Row numbers in messages count data rows from 0 (line row + 2 of a CSV file with a header).
    """
    if date_column is not None:
        if date_column not in frame.columns:
            raise ValueError(f"{source}: expected a date column {date_column!r}, found columns {list(frame.columns)}")
        try:
            dates = pd.to_datetime(frame[date_column], errors="coerce")
        except ValueError as error:  # e.g. timestamps in several time zones
            raise ValueError(f"{source}: column {date_column!r}: expected timestamps of one kind, found: "
                             f"{error}") from None
        if dates.isna().any():
            row = int(np.flatnonzero(dates.isna().to_numpy())[0])
            raise ValueError(f"{source}: column {date_column!r} row {row}: expected a timestamp, found "
                             f"{frame[date_column].iloc[row]!r}")
        step = dates.diff().to_numpy()[1:]
        if (step == np.timedelta64(0)).any():
            row = int(np.flatnonzero(step == np.timedelta64(0))[0]) + 1
            raise ValueError(f"{source}: column {date_column!r} row {row}: duplicated timestamp {dates.iloc[row]} "
                             f"(same as row {row - 1})")
        if (step < np.timedelta64(0)).any():
            row = int(np.flatnonzero(step < np.timedelta64(0))[0]) + 1
            raise ValueError(f"{source}: column {date_column!r} row {row}: timestamps must increase, found "
                             f"{dates.iloc[row]} after {dates.iloc[row - 1]}")
        frame = frame.drop(columns=[date_column])
    if frame.shape[1] == 0:
        raise ValueError(f"{source}: expected at least one numeric channel besides the date, found none")
    values = {}
    for column in frame.columns:
        raw = frame[column]
        numeric = pd.to_numeric(raw, errors="coerce")
        bad = numeric.isna() & raw.notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{source}: column {column!r} row {row}: expected a number, found {raw.iloc[row]!r}")
        infinite = np.isinf(numeric.to_numpy(dtype="float64", na_value=0.0))
        if infinite.any():
            row = int(np.flatnonzero(infinite)[0])
            raise ValueError(f"{source}: column {column!r} row {row}: expected a finite number, found "
                             f"{str(raw.iloc[row])!r}")
        missing = numeric.isna()
        if missing.any():
            if fill == "error":
                row = int(np.flatnonzero(missing.to_numpy())[0])
                raise ValueError(f"{source}: column {column!r} has {int(missing.sum())} missing values, the first at "
                                 f"row {row}; set fill: ffill or fill: interpolate to fill them")
            numeric = numeric.interpolate(limit_direction="both") if fill == "interpolate" else numeric.ffill().bfill()
            if numeric.isna().any():
                raise ValueError(f"{source}: column {column!r} has no value at all to fill from")
        values[column] = numeric.astype("float64")
    return pd.DataFrame(values)


class WindowDataset(Dataset):
    """Every (lookback, horizon) window of a (rows, channels) array: x (L, c) and y (H, c), float32."""

    def __init__(self, values: np.ndarray, lookback: int, horizon: int):
        self.values = torch.as_tensor(values, dtype=torch.float32)
        self.lookback, self.horizon = lookback, horizon

    def __len__(self) -> int:
        return max(0, self.values.shape[0] - self.lookback - self.horizon + 1)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        i = i % len(self)
        x = self.values[i : i + self.lookback]
        return x, self.values[i + self.lookback : i + self.lookback + self.horizon]


class ForecastDataModule(SplitDataModule):
    """Standard splits, a train-only scaler and windows of a table; subclasses say where the table comes from."""

    def __init__(
        self,
        *,
        lookback: int = 336,
        horizon: int = 96,
        features: Features = "M",
        target: str | None = "OT",
        split: SplitKind = "auto",
        fill: FillPolicy = "error",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        if lookback < 1 or horizon < 1:
            raise ValueError(f"lookback and horizon must be positive, found lookback={lookback}, horizon={horizon}")
        if features not in ("M", "S"):
            raise ValueError(f"features must be 'M' (multivariate) or 'S' (univariate target), found {features!r}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1 (or null: batch_size), found {eval_batch_size}")
        self.lookback, self.horizon, self.features, self.target = lookback, horizon, features, target
        self.split, self.fill = split, fill
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, WindowDataset] = {}

    # ---- what a subclass provides ------------------------------------------------------------------------------
    def load_frame(self) -> tuple[pd.DataFrame, str | None, str]:
        """(table, its date column or None, a name for messages and split detection)."""
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------------------------
    def prepare_values(self) -> tuple[np.ndarray, list[str], dict[str, tuple[int, int]]]:
        """Validated, selected and scaled values (rows, c), channel names and split borders."""
        frame, date_column, name = self.load_frame()
        channels = validate_frame(frame, date_column=date_column, fill=self.fill, source=name)
        if self.features == "S":
            target = self.target or channels.columns[-1]
            if target not in channels.columns:
                raise ValueError(f"{name}: features 'S' needs target column {target!r}, found {list(channels.columns)}")
            channels = channels[[target]]
        rows = len(channels)
        if rows < self.lookback + self.horizon:
            raise ValueError(f"{name}: has {rows} rows, fewer than lookback + horizon = "
                             f"{self.lookback} + {self.horizon} = {self.lookback + self.horizon}")
        borders = split_borders(rows, self.lookback, resolve_split(self.split, name))
        values = channels.to_numpy()
        train = values[slice(*borders["train"])]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            self.mean, self.std = train.mean(axis=0), train.std(axis=0)  # StandardScaler (population std)
            scaled = (values - self.mean) / self.std
            fits = np.isfinite(self.mean) & np.isfinite(self.std) & np.isfinite(scaled.astype(np.float32)).all(axis=0)
        constant = train.min(axis=0) == train.max(axis=0)  # exact: a rounded mean gives such a column std > 0
        if constant.any():
            column = channels.columns[int(np.flatnonzero(constant)[0])]
            raise ValueError(f"{name}: column {column!r} is constant over the train split; it cannot be scaled")
        if not fits.all():
            i = int(np.flatnonzero(~fits)[0])
            raise ValueError(f"{name}: column {channels.columns[i]!r}: values too large to standardise in float32 "
                             f"(train mean {self.mean[i]:.3g}, std {self.std[i]:.3g}, largest magnitude "
                             f"{np.abs(values[:, i]).max():.3g})")
        for split, (start, end) in borders.items():
            if end - start < self.lookback + self.horizon:
                raise ValueError(f"{name}: the {split} split (rows {start}..{end}) holds no window of lookback + "
                                 f"horizon = {self.lookback + self.horizon} rows")
        return scaled, list(channels.columns), borders

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        values, self.channels, self.borders = self.prepare_values()
        for split in SPLITS:
            self.datasets[split] = WindowDataset(values[slice(*self.borders[split])], self.lookback, self.horizon)

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    def split_loader(self, split: str, train: bool):
        # training drops its last partial batch; every validation and test window is kept (PatchTST's code drops
        # the last partial test batch, which changes the figure)
        return make_loader(self.datasets[split], batch_size=self.batch_size if train else self.eval_batch_size,
                           shuffle=train, num_workers=self.num_workers, drop_last=train)


# The four ETT files at a fixed commit of the ETDataset repository (Zhou et al.), checked by their git blob ids.
ETT_COMMIT_URL = ("https://raw.githubusercontent.com/zhouhaoyi/ETDataset/"
                  "1d16c8f4f943005d613b5bc962e9eeb06058cf07/ETT-small")
ETT_CHECKSUMS = {
    "ETTh1.csv": "git-blob-sha1:a52c4925778c07c1ef1a2cf6fd01594919717d9e",
    "ETTh2.csv": "git-blob-sha1:6e3760778598fdee5208213d3fce122637307eec",
    "ETTm1.csv": "git-blob-sha1:62c9f979e2dc5b05d9cc5b38891e60e6baf77417",
    "ETTm2.csv": "git-blob-sha1:f9d46027c987d442d2d8f81308d1d8c4d1d35db8",
}


class CSVForecastDataModule(ForecastDataModule):
    """An ETT-format CSV file: a date column plus numeric channels (`path` relative paths resolve from the cwd).

    With `download: true` a missing ETTh1/ETTh2/ETTm1/ETTm2.csv (named by `path`'s file name) is fetched from the
    ETDataset repository (or `url`, a mirror) and checked against its known checksum (or `checksum`)."""

    def __init__(self, path: str, *, date_column: str = "date", download: bool = False, url: str | None = None,
                 checksum: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path, self.date_column = path, date_column
        self.download, self.url, self.checksum = download, url, checksum

    def prepare_data(self) -> None:
        path = Path(self.path)
        if not self.download or path.is_file():
            return
        checksum = self.checksum or ETT_CHECKSUMS.get(path.name)
        if checksum is None:
            raise ValueError(f"data.path {path}: download knows the ETT files {sorted(ETT_CHECKSUMS)}; for another "
                             f"file give data.url and data.checksum ('sha256:<hex>')")
        fetch(self.url or f"{ETT_COMMIT_URL}/{path.name}", path, checksum)

    def load_frame(self) -> tuple[pd.DataFrame, str | None, str]:
        path = Path(self.path)
        if not path.is_file():
            source = (f"set data.download: true to fetch it from the ETDataset repository ({ETT_COMMIT_URL}/"
                      f"{path.name})" if path.name in ETT_CHECKSUMS else "point data.path at an ETT-format CSV")
            raise FileNotFoundError(f"data.path: expected an ETT-format CSV file, found nothing at {path.resolve()}; "
                                    f"{source}")
        return read_table(path), self.date_column, str(path)


BundledName = Literal["co2", "sunspots"]


class BundledForecastDataModule(ForecastDataModule):
    """A real univariate series shipped inside statsmodels (no network): Mauna Loa weekly CO2 (1958–2001, 2,284
    weeks, 59 missing: needs `fill`) or yearly sunspot numbers (1700–2008, 309 years)."""

    def __init__(self, name: BundledName = "co2", *, target: str | None = None, split: SplitKind = "ratio", **kwargs):
        super().__init__(target=target, split=split, **kwargs)
        self.name = name

    def load_frame(self) -> tuple[pd.DataFrame, str | None, str]:
        from statsmodels import datasets

        if self.name == "co2":
            frame = datasets.co2.load_pandas().data.rename_axis("date").reset_index()
        elif self.name == "sunspots":
            data = datasets.sunspots.load_pandas().data
            frame = pd.DataFrame({"date": pd.to_datetime(data["YEAR"].astype(int).astype(str), format="%Y"),
                                  "sunspots": data["SUNACTIVITY"]})
        else:
            raise ValueError(f"bundled series: expected 'co2' or 'sunspots', found {self.name!r}")
        return frame, "date", f"statsmodels:{self.name}"
