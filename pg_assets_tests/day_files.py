"""Find what landed in Bronze for a day without depending on the exact file naming (the layout
versions the data file name): after a run, a day folder holds exactly one data file."""

import datetime as dt
import gzip
from pathlib import Path


def day_data_file(root: str | Path, day: dt.date) -> Path:
    files = sorted(Path(root).glob(f"**/date={day.isoformat()}/*.csv.gz"))
    files = [f for f in files if "_staging" not in f.parts]
    assert len(files) == 1, f"expected one data file for {day} under {root}, found {files}"
    return files[0]


def day_bytes(root: str | Path, day: dt.date) -> bytes:
    """The decompressed CSV of `day` (gzip codec)."""
    return gzip.decompress(day_data_file(root, day).read_bytes())


def no_day_files(root: str | Path, day: dt.date) -> bool:
    return not [
        f for f in Path(root).glob(f"**/date={day.isoformat()}/*") if "_staging" not in f.parts
    ]
