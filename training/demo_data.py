"""Moved to dataset_prep/demo_data.py; `training.demo_data` stays importable as that very module."""
import sys

from dataset_prep import demo_data

sys.modules[__name__] = demo_data
