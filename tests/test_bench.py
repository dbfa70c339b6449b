"""polyformer.bench, the runner the benchmarks are built on: a real fit and test through the CLI, its metric read
back, a finished run reused instead of rerun, records, failures that name their log, and the figures' summary."""

import json
import sys
from pathlib import Path

import pytest

from polyformer.bench import (QUICK, RunError, bench_parser, evaluate, finished, fit, fit_and_test, history, last_value,
                              last_values, recorded, run, run_dir, runs_parser, summarise, write_json)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "core" / "sort_tiny.yaml"
SMALL = QUICK + ["--data.init_args.train_size=64", "--data.init_args.val_size=32", "--data.init_args.test_size=32",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def write_metrics(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    names = sorted({name for row in rows for name in row})
    lines = [",".join(names)] + [",".join(str(row.get(name, "")) for name in names) for row in rows]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_fit_and_test_runs_the_cli_and_reuses_a_finished_run(tmp_path, capsys):
    value = fit_and_test(CONFIG, tmp_path, "tiny", SMALL, checkpoint="last", metric="test/token_acc", reuse=False)
    folder = run_dir(tmp_path, CONFIG, "tiny")
    assert folder == tmp_path / "runs" / "core" / "tiny"
    assert 0.0 <= value <= 1.0 and value == last_value(folder, "test/token_acc")
    assert (tmp_path / "logs" / "tiny.fit.log").is_file() and (tmp_path / "logs" / "tiny.test.log").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["version_0", "version_1"]  # fit, then test
    capsys.readouterr()
    again = fit_and_test(CONFIG, tmp_path, "tiny", SMALL, checkpoint="last", metric="test/token_acc", reuse=True)
    assert again == value and "reusing" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["version_0", "version_1"]  # nothing ran again


def test_fit_then_validate_and_test_with_two_config_files(tmp_path):
    """The two halves of fit_and_test: a fit of a config and an override file, its last checkpoint validated and
    tested (a tagged log each), every metric of both stages read back from the run folder."""
    override = tmp_path / "seed.yaml"
    override.write_text("seed_everything: 3\n")
    fitted = fit([CONFIG, override], tmp_path, "two", SMALL)
    assert fitted.version == run_dir(tmp_path, CONFIG, "two") / "version_0" and fitted.seconds > 0
    assert fitted.checkpoint("last").is_file()
    for stage in ("validate", "test"):
        evaluate(stage, [CONFIG, override], tmp_path, "two", SMALL, fitted.checkpoint("last"), tag="last")
        assert (tmp_path / "logs" / f"two.{stage}_last.log").is_file()
    folder = run_dir(tmp_path, CONFIG, "two")
    assert sorted(p.name for p in folder.iterdir()) == ["version_0", "version_1", "version_2"]
    assert 0.0 <= last_value(folder, "val/token_acc") <= 1.0 and 0.0 <= last_value(folder, "test/token_acc") <= 1.0
    assert "seed_everything: 3" in (fitted.version / "config.yaml").read_text()  # the second file was read


def test_a_failing_command_names_itself_and_its_log(tmp_path):
    log = tmp_path / "logs" / "bad.log"
    with pytest.raises(RunError, match=r"failed \(3\): .* see .*bad\.log"):
        run([sys.executable, "-c", "import sys; print('why'); sys.exit(3)"], log)
    assert log.read_text() == "why\n"


def test_metrics_come_from_the_newest_version_that_logged_them(tmp_path):
    write_metrics(tmp_path / "version_0", [{"val/acc": 0.5, "step": 1}, {"val/acc": 0.7, "step": 2}])
    write_metrics(tmp_path / "version_1", [{"test/acc": 0.65}])
    assert history(tmp_path, "val/acc") == [0.5, 0.7]
    assert last_value(tmp_path, "val/acc") == 0.7 and last_value(tmp_path, "test/acc") == 0.65
    assert last_values(tmp_path / "version_0" / "metrics.csv") == {"val/acc": 0.7, "step": 2.0}
    assert finished(tmp_path, "test/loss") is None
    with pytest.raises(KeyError, match="test/loss not logged in any version under"):
        last_value(tmp_path, "test/loss")


def test_recorded_work_is_produced_once_and_read_back(tmp_path):
    record, calls = tmp_path / "records" / "piece.json", []

    def produce():
        calls.append(1)
        return {"minutes": 1.5}

    assert recorded(record, reuse=True, produce=produce) == {"minutes": 1.5}
    assert recorded(record, reuse=True, produce=produce) == {"minutes": 1.5} and len(calls) == 1
    assert recorded(record, reuse=True, produce=produce, done=False) and len(calls) == 2  # unfinished: again
    assert recorded(record, reuse=False, produce=produce) and len(calls) == 3  # not reusing: again
    assert json.loads(record.read_text()) == {"minutes": 1.5}


def test_figures_and_command_lines(tmp_path):
    assert summarise({0: 1.0, 1: 2.0, 2: 3.0}) == (2.0, 1.0)
    assert summarise({5: 0.25}) == (0.25, 0.0)
    with pytest.raises(ValueError, match="at least one run"):
        summarise({})
    write_json(tmp_path / "out" / "figures.json", {"acc": 0.5})
    assert json.loads((tmp_path / "out" / "figures.json").read_text()) == {"acc": 0.5}
    write_json(None, {"acc": 0.5})  # no --json: nothing written
    args = bench_parser("b", tmp_path).parse_args(["--quick", "--reuse", "--json", "x.json"])
    assert args.quick and args.reuse and args.json == Path("x.json") and args.out == tmp_path
    args = runs_parser("b", tmp_path, ["vision", "speech"]).parse_args(["--domains", "speech", "--seeds", "3"])
    assert args.domains == ["speech"] and args.seeds == [3] and args.jobs == 2
