"""CI smoke test of benchmarks/ablations.py --quick (the paper's ablations at small scale),
offline on the tiny text fixture: every configuration runs, the table/plot/JSON are
written, the numbers in them are the runs' own, and the findings follow from them."""

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import pytest

from mod_ext import data as mdata

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "tiny.txt"


def _load():
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "benchmarks" / "ablations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations")
    mp = pytest.MonkeyPatch()

    def no_network(*args, **kwargs):
        raise AssertionError("the ablation smoke test must not touch the network")

    mp.setattr(mdata, "fetch_shakespeare", no_network)
    mp.setattr(subprocess, "run", no_network)
    ab = _load()
    try:
        rows = ab.main(["--quick", "--data", str(FIXTURE), "--out", str(out), "--seeds", "1", "2",
                        "--dense-steps", "4", "--eval-every", "2", "--threads", "1"])
    finally:
        mp.undo()
    return ab, out, rows


def test_every_configuration_at_the_same_flops(sweep):
    ab, out, rows = sweep
    assert sorted({r["config"] for r in rows}) == sorted(ab.CONFIGS) and len(rows) == 2 * len(ab.CONFIGS)
    dense = [r for r in rows if r["config"] == "dense"]
    assert all(r["steps"] == 4 for r in dense)
    budget = ab.budget(ab.parse_args(["--quick", "--dense-steps", "4"]))
    for r in rows:
        # each run buys floor(budget / its step cost) steps: within one step of the budget, never above
        per_step = r["train_flops"] / r["steps"]
        assert budget - per_step < r["train_flops"] <= budget, r["config"]
        assert math.isfinite(r["val_loss"]) and r["tokens_per_s"] > 0
        if r["config"] != "dense":
            assert r["flops_per_token"] < dense[0]["flops_per_token"]
            assert 0 <= r["causal_recall"] <= 1 and math.isfinite(r["causal_val_loss"])
        assert r["final_hidden_rms"] > 0
    # the runs' own metrics.json is what the rows report
    m = json.loads((out / "mod_c0.125_every2_s1" / "metrics.json").read_text())
    r = next(r for r in rows if r["config"] == "mod_c0.125_every2" and r["seed"] == 1)
    assert r["val_loss"] == m["evals"][-1]["val_loss"] and r["causal_recall"] == m["causal_recall"]
    assert m["config"]["model"]["random_routing"] is False
    assert json.loads((out / "random_c0.125_every2_s1" / "metrics.json").read_text())["config"]["random_routing"]


def test_table_plot_and_findings(sweep):
    ab, out, rows = sweep
    text = (out / "ablations.md").read_text()
    by = ab.aggregate(rows)
    for name, label in ((n, ab.CONFIGS[n][0]) for n in ab.CONFIGS):
        line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert ab.fmt(by[name]["val_loss"]) in line, name
    vals = [r["val_loss"] for r in rows if r["config"] == "dense"]
    assert by["dense"]["val_loss"][0] == pytest.approx(sum(vals) / 2)
    assert by["dense"]["val_loss"][1] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    findings = ab.findings(by)
    assert len(findings) == 6 and all(f in text for f in findings)
    best = min(("mod_c0.125_every2", "mod_c0.125_every1", "mod_c0.25_every2", "mod_c0.5_every2"),
               key=lambda n: by[n]["val_loss"][0])
    assert ("not reproduced" in findings[0]) == (best != "mod_c0.125_every2")
    assert (out / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "ablations.json").read_text())
    assert len(saved["runs"]) == len(rows)


def test_report_only_rebuilds_from_saved_runs(sweep):
    ab, out, rows = sweep
    again = ab.main(["--quick", "--data", str(FIXTURE), "--out", str(out), "--seeds", "1", "2",
                     "--dense-steps", "4", "--eval-every", "2", "--report"])
    assert [(r["config"], r["seed"], r["val_loss"]) for r in again] == \
        [(r["config"], r["seed"], r["val_loss"]) for r in rows]
