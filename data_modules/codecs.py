"""Which zarr codec pipeline decodes the streamed X blocks (zarrs or zarr-python), and concurrent reads."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import zarr
import zarr.core.buffer

from scgpt.errors import DataError

PYTHON_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"
_ZARRS_PIDS: set[int] = set()  # processes in which a zarrs-decoded array was opened (its threads run there)


def block_codec_pipeline() -> str:
    """The codec pipeline that decodes the X blocks: the Rust ``zarrs`` pipeline when the optional ``zarrs``
    package is importable, zarr-python's otherwise; ``SCGPT_ZARRS=0`` forces zarr-python, ``SCGPT_ZARRS=1``
    requires zarrs.

    zarrs decodes on a process-wide thread pool, and a process forked after that pool started inherits it
    without its threads: any zarrs read there hangs. So metadata, obs and whole-``indptr`` reads always use
    zarr-python (setting a DataModule up never starts the pool in the parent, and forked DataLoader
    workers start their own), and a process forked from one whose pool runs (a DataLoader with workers
    after a 0-worker pass over zarrs, for example) decodes with zarr-python instead of hanging."""
    setting = os.environ.get("SCGPT_ZARRS", "auto").strip().lower()
    if setting in ("0", "false", "no", "off") or inherited_zarrs_pool():
        return PYTHON_PIPELINE
    try:
        import zarrs  # noqa: F401
    except ImportError:
        if setting in ("1", "true", "yes", "on"):
            raise DataError("SCGPT_ZARRS=1 but the zarrs package is not installed; pip install zarrs "
                            "or unset SCGPT_ZARRS") from None
        return PYTHON_PIPELINE
    return ZARRS_PIPELINE


def zarrs_started_here() -> bool:
    """Whether this process has opened a zarrs-decoded array (its thread pool runs here)."""
    return os.getpid() in _ZARRS_PIDS


def inherited_zarrs_pool() -> bool:
    """Whether this process was forked from one running zarrs' thread pool (zarrs would hang here)."""
    return bool(_ZARRS_PIDS) and not zarrs_started_here()


def _python_pipeline():
    """A context in which opened arrays decode with zarr-python's pipeline, whatever the global setting.
    A global zarrs setting marks this process as running zarrs (whatever it reads outside our stores may
    start the pool), so that its forks fall back to zarr-python."""
    if zarr.config.get("codec_pipeline.path") == ZARRS_PIPELINE:
        _ZARRS_PIDS.add(os.getpid())
    return zarr.config.set({"codec_pipeline.path": PYTHON_PIPELINE})


async def _read_into(pairs: list[tuple[zarr.Array, int, int, np.ndarray]]) -> None:
    """Values [a, b) of each array into its ``out`` array, all reads at once (the pipeline decodes the
    chunks of concurrent reads in parallel)."""
    nd = zarr.core.buffer.default_buffer_prototype().nd_buffer
    await asyncio.gather(*(array.async_array.get_orthogonal_selection((slice(a, b),), out=nd.from_numpy_array(out))
                           for array, a, b, out in pairs if b > a))



def note_zarrs_started() -> None:
    """Record that this process opened a zarrs-decoded array (its thread pool now runs here)."""
    _ZARRS_PIDS.add(os.getpid())
