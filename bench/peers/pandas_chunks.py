"""pandas `read_sql` in chunks, each appended with `to_csv` into one gzip file."""

import os
import sys

import pandas as pd
import psycopg


def main(table: str, out: str) -> None:
    with psycopg.connect(os.environ["PG_ASSETS_CONNINFO"]) as conn:
        first = True
        for chunk in pd.read_sql(f"SELECT * FROM {table}", conn, chunksize=100_000):  # noqa: S608 (bench table name)
            chunk.to_csv(out, mode="w" if first else "a", header=first, index=False,
                         compression={"method": "gzip", "compresslevel": 6})  # fmt: skip
            first = False


if __name__ == "__main__":
    main(*sys.argv[1:])
