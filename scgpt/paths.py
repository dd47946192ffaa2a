"""Where the packaged Hydra configs live, in a checkout or an installed wheel alike."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def config_dir() -> Path:
    """The ``conf/`` directory shipped as the ``scgpt.conf`` package."""
    spec = importlib.util.find_spec("scgpt.conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "conf"  # a source checkout not yet installed
