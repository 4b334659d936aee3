"""dlt's `sql_table` source (pyarrow backend) into its filesystem destination."""

import os
import sys


def main(table: str, out_dir: str, file_format: str) -> None:
    import dlt
    from dlt.sources.sql_database import sql_table

    schema, name = table.split(".")
    info = dict(kv.split("=", 1) for kv in os.environ["PG_ASSETS_CONNINFO"].split())
    url = f"postgresql://{info['user']}@{info['host']}:{info['port']}/{info['dbname']}"
    os.environ["DATA_WRITER__DISABLE_COMPRESSION"] = "false"
    os.environ["RUNTIME__LOG_LEVEL"] = "WARNING"
    os.environ["DLT_DATA_DIR"] = os.path.join(out_dir, ".dlt")
    source = sql_table(credentials=url, schema=schema, table=name, backend="pyarrow")
    pipeline = dlt.pipeline(
        pipeline_name=f"bench_{file_format}",
        destination=dlt.destinations.filesystem(bucket_url=f"file://{out_dir}"),
        dataset_name="bronze",
        pipelines_dir=os.path.join(out_dir, ".pipelines"),
    )
    pipeline.run(source, loader_file_format=file_format)


if __name__ == "__main__":
    main(*sys.argv[1:])
