"""Constants shared by test modules (importable because pytest puts tests/ on sys.path)."""

GOOD_SUITE = {
    "name": "good",
    "grid": {"regularizer": ["base"], "model": ["conv4"], "dataset": ["synthetic"], "seed": [0]},
    "train": {"steps": 4, "batch_size": 32, "eval_every": 2, "eval_batch_size": 100},
    "model_kwargs": {"width": 8},
}
