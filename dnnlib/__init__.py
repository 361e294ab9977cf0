"""Small utilities shared by every script; `dnnlib.util.EasyDict` is part of the
network-pickle format (docs/DESIGN.md section 4), so this package keeps that path."""

from . import util
from .util import EasyDict

__all__ = ['util', 'EasyDict']
