"""ETT-format CSV reading under bad input, tried systematically (hypothesis): one defect in a good table, and
arbitrary text or bytes. Every case ends in a ValueError naming the file (and the column and row where there is one);
docs/reliability.md lists the cases and what each gives."""

from __future__ import annotations

import re
import string
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyformer.domains.timeseries.data import CSVForecastDataModule

# deterministic runs of a stated size: the counts in docs/reliability.md are these max_examples
BAD_INPUT = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LOOKBACK, HORIZON = 8, 4
DEFECTS = ["text", "empty", "inf", "bad_date", "duplicate_date", "unsorted_date", "extra_field", "short_row",
           "few_rows", "constant", "huge", "no_date_column", "mixed_tz"]


def write(folder: Path, text: str | bytes) -> Path:
    path = Path(tempfile.mkdtemp(dir=folder)) / "table.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def module(path: Path) -> CSVForecastDataModule:
    return CSVForecastDataModule(str(path), lookback=LOOKBACK, horizon=HORIZON, split="ratio")


def short_split(rows: int) -> str | None:
    """What the message says about a table of `rows` rows that is too short for a window in each 70/10/20 % split
    (val and test start LOOKBACK rows early); None when it is long enough."""
    window, train, test = LOOKBACK + HORIZON, int(rows * 0.7), int(rows * 0.2)
    if rows < window:
        return f"has {rows} rows"
    for split, length in (("train", train), ("val", rows - test - train + LOOKBACK), ("test", test + LOOKBACK)):
        if length < window:
            return rf"the {split} split \(rows -?\d+\.\.\d+\) holds no window"
    return None


@st.composite
def table_with_one_defect(draw, defect: str) -> tuple[str, str | None, str | None]:
    """(CSV text, column the message must name, row / line marker it must name)."""
    rows, channels = draw(st.integers(40, 80)), draw(st.integers(1, 3))
    names = [f"c{i}" for i in range(channels)]
    noise = draw(st.lists(st.floats(-100, 100, allow_nan=False), min_size=rows * channels,
                          max_size=rows * channels))
    values = np.arange(rows)[:, None] * (1.0 + np.arange(channels)) + np.reshape(noise, (rows, channels))
    dates = list(pd.date_range("2020-01-01", periods=rows, freq="h").strftime("%Y-%m-%d %H:%M:%S"))
    cells = [[repr(float(v)) for v in row] for row in values]
    header = ["date", *names]
    row, col = draw(st.integers(1, rows - 1)), draw(st.integers(0, channels - 1))
    column, where = names[col], f"row {row}"
    if defect == "text":  # letters and symbols only: never a number (some spell a missing value: 'NA', 'null')
        cells[row][col] = draw(st.text(string.ascii_letters + "!?#$%&*/;:_ ", min_size=1, max_size=8))
    elif defect == "empty":
        cells[row][col] = ""
    elif defect == "inf":
        cells[row][col] = draw(st.sampled_from(["inf", "-inf", "Infinity", "1e999", "-2e400"]))
    elif defect == "bad_date":
        row = draw(st.integers(0, rows - 1))
        dates[row], column, where = draw(st.text("!?#@qxz", min_size=1, max_size=6)), "date", f"row {row}"
    elif defect == "duplicate_date":
        dates[row], column = dates[row - 1], "date"
    elif defect == "unsorted_date":
        dates[row - 1], dates[row], column = dates[row], dates[row - 1], "date"
    elif defect == "extra_field":
        row = draw(st.integers(0, rows - 1))
        cells[row].append("1.0")
        column, where = None, f"line {row + 2}"
    elif defect == "short_row":
        cells[row].pop()
        column = names[-1]
    elif defect == "few_rows":  # too few for one window, or for one window in each 70/10/20 % split
        rows = draw(st.integers(0, 40).filter(lambda n: short_split(n) is not None))
        dates, cells, column, where = dates[:rows], cells[:rows], None, short_split(rows)
    elif defect == "constant":
        constant = repr(draw(st.floats(-1e6, 1e6, allow_nan=False)))
        for line in cells:
            line[col] = constant
        where = "constant"
    elif defect == "huge":  # large enough that the squares overflow: the scaler cannot standardise the column
        cells[row][col] = repr(draw(st.floats(1e155, 1e308)) * draw(st.sampled_from([1, -1])))
        where = "too large"
    elif defect == "no_date_column":
        header[0] = draw(st.text("xyz", min_size=1, max_size=5))
        column, where = "date", None
    elif defect == "mixed_tz":
        dates = [d + "+01:00" for d in dates]
        dates[row] = dates[row][:-6] + "+02:00"
        column, where = "date", None
    lines = [",".join(header)] + [",".join([d, *c]) for d, c in zip(dates, cells)]
    return "\n".join(lines) + "\n", column, where


@pytest.mark.parametrize("defect", DEFECTS)
@settings(max_examples=25, **BAD_INPUT)
@given(data=st.data())
def test_one_defect_in_a_good_table_is_an_error_naming_file_column_and_row(tmp_path, defect, data):
    text, column, where = data.draw(table_with_one_defect(defect))
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as error:
        module(path).setup()
    message = str(error.value)
    assert str(path) in message, message
    assert column is None or f"'{column}'" in message, (defect, message)
    assert where is None or re.search(rf"{where}\b", message), (defect, where, message)


def check_loads_cleanly_or_names_the_file(path: Path) -> str:
    """'loaded' (every window of every split there, every value finite) or 'ValueError' (naming the file)."""
    data = module(path)
    try:
        data.setup()
    except ValueError as error:
        assert str(path) in str(error), str(error)
        return "ValueError"
    rows = sum(1 for line in path.read_text().splitlines() if line) - 1  # pandas skips empty lines; less the header
    for split, (start, end) in data.borders.items():
        assert len(data.datasets[split]) == end - start - LOOKBACK - HORIZON + 1
        assert np.isfinite(data.datasets[split].values.numpy()).all()
    assert data.borders["test"][1] == rows
    return "loaded"


GOOD = "date,a,b\n" + "".join(f"2021-03-{1 + i // 24:02d} {i % 24:02d}:00:00,{i * 0.5},{(i * 7) % 11 - 5}\n"
                                for i in range(60))
CSV_CHARACTERS = ",\n\"0123456789.-+eEinfaNd :T"


def test_a_mutated_table_loads_cleanly_or_is_an_error_naming_the_file(tmp_path):
    outcomes = Counter()

    @settings(max_examples=300, **BAD_INPUT)
    @given(edits=st.lists(st.tuples(st.integers(0, len(GOOD)), st.sampled_from(["insert", "replace", "delete"]),
                                    st.sampled_from(string.digits) | st.sampled_from(CSV_CHARACTERS)),
                          min_size=1, max_size=4))
    def mutate(edits):
        text = GOOD
        for position, edit, character in edits:
            position = min(position, len(text))
            if edit == "insert":
                text = text[:position] + character + text[position:]
            else:
                text = text[:position] + (character if edit == "replace" else "") + text[position + 1:]
        outcomes[check_loads_cleanly_or_names_the_file(write(tmp_path, text))] += 1

    assert check_loads_cleanly_or_names_the_file(write(tmp_path, GOOD)) == "loaded"
    mutate()
    # a fuzzer that only ever fails, or only loads, has tried too little (here: 17 of 300 load, 283 fail)
    assert outcomes["loaded"] >= 10 and outcomes["ValueError"] >= 100, outcomes


@settings(max_examples=100, **BAD_INPUT)
@given(body=st.text(alphabet=CSV_CHARACTERS, max_size=600), header=st.sampled_from(["", "date,a\n", "a,b\n"]))
def test_arbitrary_text_loads_cleanly_or_is_an_error_naming_the_file(tmp_path, body, header):
    check_loads_cleanly_or_names_the_file(write(tmp_path, header + body))


@settings(max_examples=100, **BAD_INPUT)
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_load_cleanly_or_are_an_error_naming_the_file(tmp_path, data):
    check_loads_cleanly_or_names_the_file(write(tmp_path, b"date,a\n" + data))

