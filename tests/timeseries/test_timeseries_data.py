"""Splits, scaling, windows and bad-input errors of the forecasting data modules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from polyformer.data import shared_data_dir
from polyformer.domains.timeseries.data import (
    BundledForecastDataModule,
    CSVForecastDataModule,
    WindowDataset,
    resolve_split,
    split_borders,
)

ETT_CSV = Path(os.environ.get("POLYFORMER_ETT_CSV", shared_data_dir() / "ett" / "ETTh1.csv"))


def write_csv(path: Path, rows: int = 200, channels: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    frame = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=rows, freq="h")})
    for i in range(channels):
        frame[f"c{i}"] = np.sin(2 * np.pi * t / (12 + 5 * i)) * (i + 1) + 0.1 * rng.standard_normal(rows) + i
    frame.to_csv(path, index=False)
    return frame


def test_ett_borders_match_the_published_protocol():
    assert split_borders(17420, 336, "etth") == {"train": (0, 8640), "val": (8304, 11520), "test": (11184, 14400)}
    assert split_borders(69680, 96, "ettm") == {"train": (0, 34560), "val": (34464, 46080), "test": (45984, 57600)}
    assert resolve_split("auto", "x/ETTh2.csv") == "etth" and resolve_split("auto", "ETTm1.csv") == "ettm"
    assert resolve_split("auto", "weather.csv") == "ratio"


def test_ratio_split_is_70_10_20_with_lookback_overlap():
    # TSLib's Dataset_Custom: train int(0.7 n), test int(0.2 n), val the rest; val/test start L rows early
    assert split_borders(1000, 24, "ratio") == {"train": (0, 700), "val": (676, 800), "test": (776, 1000)}


def test_windows_scaler_and_full_test_loader(tmp_path):
    frame = write_csv(tmp_path / "toy.csv", rows=200)
    dm = CSVForecastDataModule(str(tmp_path / "toy.csv"), lookback=24, horizon=8, batch_size=16, eval_batch_size=7)
    dm.setup()
    train_rows = frame.iloc[:140, 1:].to_numpy()
    np.testing.assert_allclose(dm.mean, train_rows.mean(axis=0))  # fitted on train rows only
    np.testing.assert_allclose(dm.std, train_rows.std(axis=0))
    test = dm.datasets["test"]
    assert len(test) == (200 - 136) - 24 - 8 + 1  # test rows [160 - 24, 200): every window
    x, y = test[len(test) - 1]
    expected = (frame.iloc[:, 1:].to_numpy() - dm.mean) / dm.std
    torch.testing.assert_close(x, torch.tensor(expected[-32:-8], dtype=torch.float32))
    torch.testing.assert_close(y, torch.tensor(expected[-8:], dtype=torch.float32))
    assert sum(batch[0].shape[0] for batch in dm.test_dataloader()) == len(test)  # no drop_last on test


def test_univariate_setting_selects_the_target(tmp_path):
    write_csv(tmp_path / "toy.csv")
    dm = CSVForecastDataModule(str(tmp_path / "toy.csv"), lookback=24, horizon=8, features="S", target="c1")
    dm.setup()
    assert dm.channels == ["c1"] and dm.datasets["train"][0][0].shape == (24, 1)
    with pytest.raises(ValueError, match="target column 'OT'"):
        CSVForecastDataModule(str(tmp_path / "toy.csv"), lookback=24, horizon=8, features="S").setup()


@pytest.mark.parametrize("corrupt, message", [
    (lambda f: f.assign(c1=f["c1"].where(f.index != 17)), r"column 'c1' has 1 missing values, the first at row 17"),
    (lambda f: f.assign(c2=f["c2"].astype(object).where(f.index != 5, "abc")), r"column 'c2' row 5: expected a number"),
    (lambda f: f.drop(index=9).reset_index(drop=True).pipe(lambda g: pd.concat([g.iloc[:30], g.iloc[[29]], g.iloc[30:]])),
     r"row 30: duplicated timestamp"),
    (lambda f: f.iloc[list(range(40)) + [41, 40] + list(range(42, len(f)))], r"row 41: timestamps must increase"),
    (lambda f: f.assign(date=f["date"].astype(str).where(f.index != 3, "yesterday")), r"row 3: expected a timestamp"),
    (lambda f: f.iloc[:30], r"has 30 rows, fewer than lookback \+ horizon = 24 \+ 8 = 32"),
])
def test_bad_tables_raise_errors_naming_column_and_row(tmp_path, corrupt, message):
    frame = write_csv(tmp_path / "toy.csv")
    corrupt(frame).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=message):
        CSVForecastDataModule(str(tmp_path / "bad.csv"), lookback=24, horizon=8).setup()


def test_missing_values_fill_is_an_explicit_opt_in(tmp_path):
    frame = write_csv(tmp_path / "toy.csv")
    frame.loc[[17, 18], "c1"] = np.nan
    frame.to_csv(tmp_path / "gaps.csv", index=False)
    for fill, expected in (("interpolate", frame["c1"].interpolate()), ("ffill", frame["c1"].ffill())):
        dm = CSVForecastDataModule(str(tmp_path / "gaps.csv"), lookback=24, horizon=8, fill=fill)
        dm.setup()
        restored = dm.datasets["train"].values[:, 1].numpy() * dm.std[1] + dm.mean[1]
        np.testing.assert_allclose(restored, expected.to_numpy()[:140], rtol=1e-5, atol=1e-5)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        CSVForecastDataModule(str(tmp_path / "nowhere.csv")).setup()


def test_window_dataset_counts_every_window():
    data = np.arange(20, dtype=np.float32)[:, None]
    dataset = WindowDataset(data, lookback=5, horizon=3)
    assert len(dataset) == 13
    x, y = dataset[12]
    assert x[:, 0].tolist() == [12, 13, 14, 15, 16] and y[:, 0].tolist() == [17, 18, 19]
    assert dataset[-1][1][:, 0].tolist() == [17, 18, 19]
    assert len(list(dataset)) == 13  # iteration stops: out-of-range windows raise IndexError


def test_bundled_co2_needs_no_network_and_an_explicit_fill():
    pytest.importorskip("statsmodels")
    with pytest.raises(ValueError, match=r"column 'co2' has 59 missing values"):
        BundledForecastDataModule("co2", lookback=104, horizon=26).setup()
    dm = BundledForecastDataModule("co2", lookback=104, horizon=26, fill="interpolate")
    dm.setup()
    assert dm.channels == ["co2"] and dm.borders["train"] == (0, 1598)
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 1469, "val": 205, "test": 431}


@pytest.mark.skipif(not ETT_CSV.is_file(), reason=f"ETTh1 not found at {ETT_CSV} (set POLYFORMER_ETT_CSV)")
def test_etth1_windows_follow_the_standard_protocol():
    dm = CSVForecastDataModule(str(ETT_CSV), lookback=336, horizon=96)
    dm.setup()
    assert dm.channels == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 8209, "val": 2785, "test": 2785}
    train = dm.datasets["train"].values
    torch.testing.assert_close(train.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
