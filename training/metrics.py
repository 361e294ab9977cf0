"""Moved to evaluation/metrics.py; `training.metrics` stays importable as that very module."""
import sys

from evaluation import metrics

sys.modules[__name__] = metrics
