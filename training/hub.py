"""Moved into dnnlib/util.py, whose open_url opens hf:// addresses; the old names stay importable."""
from dnnlib.util import HF_EXAMPLE as EXAMPLE, HF_INSTALL_HINT as INSTALL_HINT  # noqa: F401
from dnnlib.util import download_hf as download, parse_hf_url as parse  # noqa: F401
