"""Optional export to LitData's optimized format, which Lightning Studio streams with `StreamingDataset`."""

from __future__ import annotations

from pathlib import Path

from forge.errors import ConfigError


def export(work: Path, splits: list[str]) -> None:
    try:
        from litdata import optimize
    except ImportError:
        raise ConfigError("prepare.export_litdata is on, but litdata is not installed in this image.",
                          "Install it in the image (`pip install litdata`), or set export_litdata: false.") from None
    for split in splits:
        files = sorted(str(path) for path in (work / split).glob("*.parquet"))
        if files:
            optimize(fn=_examples, inputs=files, output_dir=str(work / "litdata" / split), chunk_bytes="64MB",
                     num_workers=1, mode="overwrite", verbose=False, reorder_files=False)


def _examples(path: str):
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for row in table.to_pylist():
        yield {key: np.asarray(value, dtype=np.int32) if isinstance(value, list) and key != "ids" else value
               for key, value in row.items() if key != "ids"}
