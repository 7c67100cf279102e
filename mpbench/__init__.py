"""mpbench: a benchmark harness for regularizers and fine-tuning in image classification."""

__version__ = "0.1.0"
