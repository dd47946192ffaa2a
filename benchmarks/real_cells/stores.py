"""Cell stores of the real-cell benchmarks, converted from the fetched files with ``scgpt-data convert``.

- ``kang.zarr``: the Kang et al. 2018 h5ad (dense X, read in row chunks of ``CHUNK_CELLS`` cells).
- ``celltypist.zarr``: celltypist's 559-cell sample CSV. Its integer counts carry float noise
  (``0.999999999999999``); the converter rounds values within 1e-6 of an integer and says how many it rounded.

    python benchmarks/real_cells/stores.py [--cache DIR]
    python benchmarks/real_cells/stores.py --measure-rss     # convert Kang into a temporary directory, print peak RSS
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch import CELLTYPIST, KANG, FetchError, default_cache, fetch

from scgpt.io import error_line

CHUNK_CELLS = 2000  # dense rows per read: 2,000 x 14,053 float32 = 112 MB (peak RSS in BENCHMARKS.md)


def run_convert(inputs: list[Path], out: Path, *extra: str) -> tuple[float, float]:
    """``scgpt-data convert INPUTS -o OUT``: -> (seconds, peak RSS of the converter in GiB, from wait4)."""
    import time

    command = ["scgpt-data", "convert", *map(str, inputs), "-o", str(out), *extra]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            stderr.seek(0)
            last = (stderr.read().decode(errors="replace").strip().splitlines() or ["?"])[-1]
            raise FetchError(f"{' '.join(command)} failed: {last}")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def convert(inputs: list[Path], out: Path, *extra: str) -> Path:
    """``scgpt-data convert`` (skipped when ``out`` exists: the converter renames only complete stores)."""
    if not out.exists():
        run_convert(inputs, out, *extra)
    return out


def build_stores(cache: Path) -> dict[str, Path]:
    files = fetch(cache)
    kang = convert([files[KANG.name]], cache / "kang.zarr", "--chunk-cells", str(CHUNK_CELLS))
    celltypist = convert([files[CELLTYPIST.name]], cache / "celltypist.zarr")
    return {"kang": kang, "celltypist": celltypist}


def measure_kang_conversion(cache: Path) -> dict[str, float]:
    """Convert the Kang h5ad again into a temporary directory: wall seconds and the converter's peak RSS."""
    files = fetch(cache)
    with tempfile.TemporaryDirectory() as tmp:
        seconds, rss_gib = run_convert([files[KANG.name]], Path(tmp) / "kang.zarr", "--chunk-cells", str(CHUNK_CELLS))
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(rss_gib, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--measure-rss", action="store_true", help="time the Kang conversion and print its peak RSS")
    args = parser.parse_args(argv)
    cache = args.cache or default_cache()
    try:
        if args.measure_rss:
            print(measure_kang_conversion(cache))
            return 0
        stores = build_stores(cache)
    except FetchError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    for path in stores.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
