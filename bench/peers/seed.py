"""The seed documents' approach, as they wrote it: psycopg2 `copy_expert` into a
`gzip.GzipFile` (default level 9) over a SpooledTemporaryFile, then the whole file read back
and "uploaded" (written out in one piece) — and its BytesIO variant, the seeds' "option 4"."""

import gzip
import io
import os
import sys
import tempfile

import psycopg2
from psycopg2 import sql


def main(mode: str, table: str, out: str) -> None:
    schema, name = table.split(".")
    copy_sql = sql.SQL("COPY (SELECT * FROM {}) TO STDOUT WITH (FORMAT csv, HEADER true)").format(
        sql.Identifier(schema, name)
    )
    conn = psycopg2.connect(os.environ["PG_ASSETS_CONNINFO"])
    if mode == "spooled":
        buffer = tempfile.SpooledTemporaryFile(max_size=100 * 1024 * 1024)
    else:
        buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz_file, conn.cursor() as cursor:
        cursor.copy_expert(copy_sql, gz_file)
    buffer.seek(0)
    with open(out, "wb") as upload:  # upload_stream_to_adls_file(adls_path, buffer)
        upload.write(buffer.read())
    buffer.close()
    conn.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
