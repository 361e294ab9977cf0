"""Moved to dataset_prep/archive.py; `training.archive` stays importable as that very module."""
import sys

from dataset_prep import archive

sys.modules[__name__] = archive
