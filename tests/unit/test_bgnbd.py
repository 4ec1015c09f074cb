"""BG/NBD: the published CDNOW estimates, the paper's forecast formula, and no NaN in hard corners."""

from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path

import pytest
from scipy.special import hyp2f1

from services.churn import bgnbd
from services.churn.transactions import TransactionsError, holdout_purchase_days, read_purchases, summarise
from services.cli import main

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "cdnow" / "CDNOW_sample.txt"
PUBLISHED = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}


def test_crm_churn_fit_reproduces_the_published_cdnow_estimates(capsys):
    code = main(["churn", "fit", "--transactions", str(SAMPLE), "--format", "cdnow-sample",
                 "--calibration-end", "1997-09-30", "--json"])  # fmt: skip
    assert code == 0
    fitted = json.loads(capsys.readouterr().out)
    assert set(fitted) == {"r", "alpha", "a", "b", "log_likelihood", "customers"}
    for name, value in PUBLISHED.items():
        assert fitted[name] == pytest.approx(value, rel=0.005), name
    assert fitted["log_likelihood"] == pytest.approx(-9582.4, abs=0.5)
    assert fitted["customers"] == 2357


def _orig_expected(p, t, x, tx, T):
    """FHL 2005 eq. 10 as printed (fine for moderate values)."""
    r, al, a, b = p.r, p.alpha, p.a, p.b
    hyp = hyp2f1(r + x, b + x, a + b + x - 1, t / (al + T + t))
    num = (a + b + x - 1) / (a - 1) * (1 - hyp * ((al + T) / (al + t + T)) ** (r + x))
    return num / (1 + (x > 0) * (a / (b + x - 1)) * ((al + T) / (al + tx)) ** (r + x))


P = bgnbd.BgNbdParams(0.243, 4.414, 0.793, 2.426)


@pytest.mark.parametrize(("t", "x", "tx", "T"), [(39, 0, 0, 38), (39, 2, 20, 38), (39, 5, 30, 35), (10, 1, 1, 2)])
def test_expected_purchases_matches_the_papers_formula(t, x, tx, T):
    assert bgnbd.expected_purchases(P, t, x, tx, T) == pytest.approx(_orig_expected(P, t, x, tx, T), rel=1e-9)


@pytest.mark.parametrize("x", [0, 1, 5, 50, 500, 5000])
@pytest.mark.parametrize("T", [1e-6, 0.01, 1.0, 39.0, 1000.0])
@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_no_nan_or_overflow_for_large_x_or_tiny_T(x, T, frac):
    pa = bgnbd.p_alive(P, x, T * frac, T)
    ep = bgnbd.expected_purchases(P, 39, x, T * frac, T)
    assert 0.0 <= pa <= 1.0 and math.isfinite(ep) and ep >= 0


def test_p_alive_properties():
    assert bgnbd.p_alive(P, 0, 0, 30) == 1.0  # no repeat purchase: never observed to drop out
    # The longer since the last purchase, the less alive; a recent buyer is nearly surely alive.
    assert bgnbd.p_alive(P, 4, 10, 39) < bgnbd.p_alive(P, 4, 30, 39) < bgnbd.p_alive(P, 4, 39, 39)
    # Right after a purchase the only doubt is the drop-out at that purchase: 1 / (1 + a / (b + x - 1)).
    assert bgnbd.p_alive(P, 4, 39, 39) == pytest.approx(1 / (1 + P.a / (P.b + 3)))


def test_the_forecast_is_of_the_right_size_on_the_holdout():
    purchases = read_purchases(SAMPLE, "cdnow-sample")
    customers = summarise(purchases, date(1997, 9, 30))
    p = bgnbd.fit([c.x for c in customers], [c.t_x for c in customers], [c.T for c in customers])
    predicted = sum(bgnbd.expected_purchases(p, 39, c.x, c.t_x, c.T) for c in customers)
    actual = sum(holdout_purchase_days(purchases, date(1997, 10, 1), date(1998, 6, 30)).values())
    # BG/NBD is known to under-forecast CDNOW's holdout a little; a broken formula is far off.
    assert 0.8 * actual < predicted < 1.05 * actual


def test_summary_merges_same_day_purchases_and_measures_weeks(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("1 0001 19970101 1 10.0\n1 0001 19970101 2 20.0\n1 0001 19970115 1 5.0\n2 0002 19970301 1 1.0\n")
    s = {c.customer_id: c for c in summarise(read_purchases(f, "cdnow-sample"), date(1997, 1, 29))}
    assert (s["0001"].x, s["0001"].t_x, s["0001"].T) == (1, 2.0, 4.0)
    assert "0002" not in s  # first purchase after the calibration end


def test_bad_files_are_reported_with_the_line(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("00001 19970101 1 10.0\n00002 1997-01-02 1 3.0\n")
    with pytest.raises(TransactionsError, match=r"bad.txt:2: '1997-01-02' is not a date"):
        read_purchases(f, "cdnow-master")
    with pytest.raises(TransactionsError, match="expected 5 columns"):
        read_purchases(f, "cdnow-sample")


def test_a_fit_that_did_not_converge_is_refused_not_adopted(monkeypatch):
    class Stopped:
        success, message, x = False, "Maximum number of function evaluations has been exceeded.", [0.0] * 4

    monkeypatch.setattr(bgnbd, "minimize", lambda *a, **k: Stopped())
    with pytest.raises(bgnbd.FitError, match=r"did not converge \(Maximum number of function evaluations"):
        bgnbd.fit([0, 2, 1], [0.0, 5.0, 3.0], [10.0, 10.0, 10.0])
