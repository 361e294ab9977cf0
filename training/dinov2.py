"""Moved to evaluation/dinov2.py; `training.dinov2` stays importable as that very module."""
import sys

from evaluation import dinov2

sys.modules[__name__] = dinov2
