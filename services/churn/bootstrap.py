"""The model a new deployment starts with, until its own customer base has enough history to refit.

Fitted on the CDNOW master file with calibration end 1997-09-30 (the output of
`crm churn backtest --transactions data/cdnow/CDNOW_master.txt --format cdnow-master
--calibration-end 1997-09-30 --observation-end 1998-06-30 --json`, its "model", version set to 0).
A live service replaces it with its first refit (version 1 and up).
"""

from services.churn.model import RiskModel

BOOTSTRAP_DOC = {
    "_id": 0,
    "params": {
        "r": 0.25162,
        "alpha": 4.7889,
        "a": 0.72343,
        "b": 2.1611,
        "log_likelihood": -95368.0,
        "customers": 23570,
    },
    "typical_gap_days": 48.4,
    "intercept": 1.7704,
    "features": {
        "expected_purchases": [-1.6438, 0.79958, -0.39327],
        "recency": [4.5419, 0.85182, 0.083407],
        "recency_ratio": [1.0529, 1.1586, 0.015469],
        "repeat_purchases": [0.34891, 0.54831, -0.40776],
        "recent_purchases": [0.20849, 0.42378, -0.048915],
        "previous_purchases": [0.79239, 0.27296, 0.022432],
        "spend_drop": [2.5421, 1.6423, 0.0],
        "mean_spend": [3.2795, 0.66649, -0.16236],
        "complaints": [0.0, 1.0, 0.6],
        "low_scores": [0.0, 1.0, 0.5],
        "engagement_drop": [0.0, 1.0, 0.3],
    },
    "fitted_on": "1997-09-30",
    "train_customers": 23570,
    "train_positive_rate": 0.82202,
    "train_auc": 0.75124,
}


def bootstrap_model() -> RiskModel:
    return RiskModel.from_doc(BOOTSTRAP_DOC)
