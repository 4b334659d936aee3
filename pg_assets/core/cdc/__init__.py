"""Change data capture from PostgreSQL logical replication, with no Dagster in it.

lsn.py       LSN text forms: PostgreSQL's `X/Y` and the 16-digit hex of file names
pgoutput.py  a decoder of the pgoutput plugin's documented message format
changes.py   change CSV files in COPY's CSV dialect, cut into compressed blocks
reader.py    one batch of whole committed transactions, streamed from the slot
slot.py      publication, slot, exported snapshot, advance, health, `check` validation
snapshot.py  a table's full extract at a slot's consistent point, through the COPY core
batch.py     exactly once in Bronze: batch manifests (the commit points), the journal head
run.py       one run end to end (setup, recovery, batches, advance); the sensor's poll
"""
