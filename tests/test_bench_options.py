"""`attnzoo bench` checks every option before the first case, locks its results folder, and never corrupts
its results file (issue 12, defects 7 and 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnzoo.bench.results import ResultsFile
from attnzoo.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _invoke(tmp_path: Path, *args: str):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the default results folder is relative
    try:
        return CliRunner().invoke(app, ["bench", *args], env={"COLUMNS": "200"})
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("args, message", [
    (["--lengths", ","], "--lengths expected at least one integer"),
    (["--lengths", "0"], "--lengths expected a positive integer, got 0"),
    (["--lengths", "a,b"], "--lengths expected comma-separated integers"),
    (["--threads", "-2"], "--threads expected a positive integer, got -2"),
    (["--repeat", "0"], "--repeat expected a positive integer, got 0"),
    (["--heads", "4", "--heads-kv", "3"], "--heads-kv expected a divisor of --heads 4, got 3"),
    (["--methods", ","], "--methods expected comma-separated names"),
    (["--methods", "exactt"], "did you mean 'exact'"),
    (["--time-cap", "nan"], "--time-cap expected a positive finite number of seconds, got nan"),
    (["--time-cap", "-1"], "--time-cap expected a positive finite number of seconds, got -1.0"),
    (["--min-time", "-1"], "--min-time expected a finite number of seconds >= 0"),
    (["--workload", "needle:needles=abc"], "workload needle: parameter 'needles' expected int, got 'abc'"),
    (["--workload", "structured:foo=1"], "workload structured: unknown parameter(s) ['foo']; valid parameters: none"),
    (["--workload", "nope"], "unknown workload 'nope'"),
    (["--compare", "/nonexistent"], "--compare expected a results.jsonl file or a folder holding one"),
    (["--compare", "/nonexistent", "/also-not"], "--compare OLD expected a results.jsonl file"),
    (["stray"], "extra arguments are only accepted as `--compare OLD NEW`"),
])
def test_bad_options_are_refused_before_any_case(tmp_path, args, message):
    res = _invoke(tmp_path, *args, "--no-report")
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not (tmp_path / "bench-results").exists()


def _record(key: str, time_s: float) -> dict:
    return {"type": "case", "key": key, "method": "exact", "workload": "gaussian", "workload_params": {},
            "length": 64, "status": "ok", "time_s": time_s, "rel_error": 1e-7}


def test_compare_two_stored_runs_without_running(tmp_path):
    for name, t in (("old", 0.002), ("new", 0.001)):
        ResultsFile(tmp_path / name).append(_record("k1", t))
    res = _invoke(tmp_path, "--compare", str(tmp_path / "old"), str(tmp_path / "new"))
    assert res.exit_code == 0, res.output
    row = [c.strip() for c in next(line for line in res.output.splitlines() if "exact" in line).split("│")]
    assert row[4:7] == ["1.00", "2.00", "2.00"]  # now ms, other ms, other/now
    assert not (tmp_path / "bench-results").exists()


def test_compare_of_runs_with_different_rounds_warns(tmp_path):
    ResultsFile(tmp_path / "old").append(_record("k1", 0.002))
    new = ResultsFile(tmp_path / "new")
    new.append(_record("k1", 0.002))
    new.append({"type": "round", "key": "k1", "round": 2, "status": "ok", "time_s": 0.001})
    res = _invoke(tmp_path, "--compare", str(tmp_path / "old"), str(tmp_path / "new"))
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "different numbers of rounds" in text and "0 of 1 cases within ±15%" in text
    assert "0 slower, 0 faster" in text  # 2x faster, but the old time lies within the new run's rounds


def test_append_ends_a_record_that_lost_its_newline(tmp_path):
    store = ResultsFile(tmp_path)
    store.path.write_text(json.dumps(_record("k1", 1.0)))  # the newline was lost
    store.append(_record("k2", 2.0))
    assert [c["key"] for c in store.read().cases] == ["k1", "k2"] and not store.read().problems


def test_a_second_writer_of_a_results_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    ResultsFile(out).append({"type": "run", "suite": {"lengths": [16], "methods": ["exact"]}})
    with ResultsFile(out).lock():  # the first `attnzoo bench` is still writing
        res = _invoke(tmp_path, "--resume", "--out", str(out), "--no-report")
    assert res.exit_code == 2 and "is being written by attnzoo bench (pid" in " ".join(res.output.split())
    with ResultsFile(out).lock():  # released: the next writer gets it
        pass


PLUGIN = '''
import attnzoo as az
from dataclasses import dataclass

@az.register
@dataclass(frozen=True)
class Broken(az.Method):
    """Always raises (a test double)."""
    name = "_broken"

    def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse):
        raise RuntimeError("broken on purpose")
'''


def test_exit_code_is_non_zero_when_every_case_failed(tmp_path):
    (tmp_path / "broken_plugin.py").write_text(PLUGIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]), COLUMNS="200")
    res = subprocess.run([sys.executable, "-m", "attnzoo.cli", "bench", "--plugin", "broken_plugin", "--methods",
                          "_broken", "--lengths", "16", "--workload", "gaussian", "--heads", "1", "--head-dim", "8",
                          "--no-report", "--out", str(tmp_path / "run")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "broken on purpose" in res.stdout and "every case failed" in res.stdout
