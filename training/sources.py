"""Moved to dataset_prep/sources.py; `training.sources` stays importable as that very module."""
import sys

from dataset_prep import sources

sys.modules[__name__] = sources
