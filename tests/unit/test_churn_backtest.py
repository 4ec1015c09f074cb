"""The churn risk score against the naive rule and BG/NBD alone, on CDNOW, through the commands users run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from services.cli import main

DATA = Path(__file__).resolve().parents[2] / "data" / "cdnow"
MASTER, SAMPLE = DATA / "CDNOW_master.txt", DATA / "CDNOW_sample.txt"


def _backtest(capsys, calibration_end: str, observation_end: str) -> dict:
    code = main(["churn", "backtest", "--transactions", str(MASTER), "--format", "cdnow-master",
                 "--calibration-end", calibration_end, "--observation-end", observation_end, "--json"])  # fmt: skip
    assert code == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "calibration_end,observation_end,goal",
    [
        ("1997-09-30", "1998-06-30", 0.77),  # the split of the goal
        ("1997-06-30", "1998-03-31", None),  # other splits: must still beat both baselines
        ("1997-12-31", "1998-06-30", None),
    ],
)
def test_the_risk_score_beats_recency_and_the_best_bgnbd_quantity(capsys, calibration_end, observation_end, goal):
    report = _backtest(capsys, calibration_end, observation_end)
    aucs = {m["name"]: m["auc"] for m in report["methods"]}
    risk = aucs.pop("risk_score")
    assert risk > aucs["days_since_last_purchase"]
    assert risk > max(v for k, v in aucs.items() if k.startswith("bgnbd_"))
    if goal is not None:
        assert risk >= goal
    # The model learned only from the calibration period.
    assert report["model"]["fitted_on"] == calibration_end


def test_crm_churn_score_writes_one_row_per_customer_with_sample_ids(tmp_path, capsys):
    out = tmp_path / "scores.csv"
    code = main(["churn", "score", "--transactions", str(SAMPLE), "--format", "cdnow-sample",
                 "--calibration-end", "1997-09-30", "--out", str(out)])  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["customer_id", "risk_score", "band", "p_alive", "expected_purchases_39w", "reasons"]
    assert len(rows) == 2357 and len({r["customer_id"] for r in rows}) == 2357
    assert {r["band"] for r in rows} <= {"low", "medium", "high", "lost"}
    assert all(0 <= float(r["risk_score"]) <= 1 and r["reasons"] for r in rows)
    assert {"0001", "2357"} <= {r["customer_id"] for r in rows}  # the sample id, as written in the file


def test_a_holdout_before_the_calibration_end_is_refused(capsys):
    code = main(["churn", "backtest", "--transactions", str(SAMPLE), "--format", "cdnow-sample",
                 "--calibration-end", "1997-09-30", "--observation-end", "1997-09-01"])  # fmt: skip
    assert code == 2
    assert "observation end must come after" in capsys.readouterr().err
