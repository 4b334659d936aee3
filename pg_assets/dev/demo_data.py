"""Demo tables that exercise every planner path with realistic, awkward data.

    public.orders      RANGE-partitioned by day on a date column, plus a DEFAULT partition
    public.events      RANGE-partitioned by month on a timestamptz column (Europe/Berlin days)
    public.customers   not partitioned, a date column
    public.payments    incremental by updated_at (see `pg_assets.dev.writer`)
    public.inventory   mode `cdc`: changes stream from the logical slot (`cdc_demo_changes`)

Rows are generated server-side with `generate_series`, so loading millions of rows (the
benchmark) costs seconds. Text columns carry commas, quotes, newlines, non-ASCII, NULLs and
empty strings, because those are what break hand-rolled CSV.
"""

import datetime as dt

import psycopg
from psycopg import sql

from pg_assets.dev.writer import create_payments

# A row expression over `g` (the series value) and `d` (the day); ~240 bytes of CSV a row.
ORDER_COLUMNS = """
    id          bigint NOT NULL,
    order_date  date NOT NULL,
    created_at  timestamptz NOT NULL,
    customer_id integer,
    amount      numeric(12,2),
    status      text,
    attrs       jsonb,
    tags        text[],
    note        text
"""

ORDER_ROW = """
    SELECT {id_base} + g,
           d::date,
           d::timestamptz + (g % 86400) * interval '1 second',
           ((g::bigint * 7919) % 100000)::int,
           round(((g::bigint * 37) % 100000)::numeric / 100, 2),
           (ARRAY['new','paid','shipped','returned','cancelled'])[1 + g % 5],
           jsonb_build_object('sku', 'SKU-' || (g % 9973), 'qty', 1 + g % 9,
                              'channel', (ARRAY['web','app','store'])[1 + g % 3],
                              'gift', g % 11 = 0, 'coupon', CASE WHEN g % 4 = 0 THEN 'SAVE10' END),
           ARRAY['t' || (g % 13), 'tag, with comma'],
           CASE g % 7
             WHEN 0 THEN NULL
             WHEN 1 THEN ''
             WHEN 2 THEN 'said "hello", left'
             WHEN 3 THEN E'multi\\nline\\nnote'
             WHEN 4 THEN 'Grüße aus Köln – ☕ 東京'
             ELSE 'plain note ' || g
           END
    FROM generate_series(1, {rows}) AS g, (SELECT {day}::date AS d) AS day
"""


def insert_orders(
    conn: psycopg.Connection, table: sql.Composable, day: dt.date, rows: int, id_base: int
) -> None:
    q = sql.SQL("INSERT INTO {t} " + ORDER_ROW).format(
        t=table, id_base=sql.Literal(id_base), rows=sql.Literal(rows), day=sql.Literal(day)
    )
    conn.execute(q)


def create_daily_partitioned(
    conn: psycopg.Connection,
    schema: str,
    name: str,
    days: list[dt.date],
    rows_per_day: int,
    *,
    default_partition: bool = True,
) -> None:
    """A table RANGE-partitioned by day on `order_date`, one child per day in `days`."""
    parent = sql.Identifier(schema, name)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(parent))
    conn.execute(
        sql.SQL("CREATE TABLE {} (" + ORDER_COLUMNS + ") PARTITION BY RANGE (order_date)").format(
            parent
        )
    )
    for day in days:
        child = sql.Identifier(schema, f"{name}_{day:%Y_%m_%d}")
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                child, parent, sql.Literal(day), sql.Literal(day + dt.timedelta(days=1))
            )
        )
    if default_partition:
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(
                sql.Identifier(schema, f"{name}_default"), parent
            )
        )
    for i, day in enumerate(days):
        insert_orders(conn, parent, day, rows_per_day, id_base=i * 10_000_000)


def load_demo(
    conn: psycopg.Connection, end: dt.date, days: int = 35, rows_per_day: int = 2000
) -> None:
    """(Re)create the three demo tables covering the `days` days up to and including `end`."""
    all_days = [end - dt.timedelta(days=n) for n in range(days - 1, -1, -1)]
    create_daily_partitioned(conn, "public", "orders", all_days, rows_per_day)
    # a late order that lands in DEFAULT: a day after the last daily partition
    insert_orders(
        conn, sql.Identifier("public", "orders"), end + dt.timedelta(days=1), 10, 9_000_000_000
    )

    conn.execute("DROP TABLE IF EXISTS public.events CASCADE")
    conn.execute(
        """CREATE TABLE public.events (
               event_id bigint, occurred_at timestamptz NOT NULL, kind text, payload jsonb,
               score double precision, ok boolean, ref uuid
           ) PARTITION BY RANGE (occurred_at)"""
    )
    first = all_days[0].replace(day=1)
    month = first
    while month <= end:
        nxt = (month + dt.timedelta(days=32)).replace(day=1)
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} PARTITION OF public.events FOR VALUES "
                "FROM ({}::timestamp AT TIME ZONE 'Europe/Berlin') "
                "TO ({}::timestamp AT TIME ZONE 'Europe/Berlin')"
            ).format(
                sql.Identifier("public", f"events_{month:%Y_%m}"),
                sql.Literal(month),
                sql.Literal(nxt),
            )
        )
        month = nxt
    conn.execute(
        """INSERT INTO public.events
           SELECT g, %s::timestamptz + g * interval '37 seconds',
                  (ARRAY['click','view','buy'])[1 + g %% 3],
                  jsonb_build_object('path', '/p/' || g %% 500, 'ua', 'Mozilla/5.0 "x"'),
                  (g %% 1000) / 7.0, g %% 2 = 0, md5(g::text)::uuid
           FROM generate_series(0, %s) AS g
           WHERE %s::timestamptz + g * interval '37 seconds' < %s::timestamptz""",
        (
            dt.datetime.combine(all_days[0], dt.time(), dt.UTC),
            days * 86400 // 37,
            dt.datetime.combine(all_days[0], dt.time(), dt.UTC),
            dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), dt.UTC),
        ),
    )

    conn.execute("DROP TABLE IF EXISTS public.customers CASCADE")
    conn.execute(
        """CREATE TABLE public.customers (
               customer_id integer PRIMARY KEY, signup_date date NOT NULL, name text,
               email text, country char(2), lifetime_value numeric(14,2), prefs jsonb,
               updated_at timestamptz DEFAULT now()
           )"""
    )
    conn.execute(
        """INSERT INTO public.customers (customer_id, signup_date, name, email, country,
                                         lifetime_value, prefs)
           SELECT g, %s::date + (g %% %s), 'Customer ' || g || CASE WHEN g %% 9 = 0 THEN ', Jr.' ELSE '' END,
                  CASE WHEN g %% 13 = 0 THEN NULL ELSE 'c' || g || '@example.com' END,
                  (ARRAY['DE','FR','JP','US'])[1 + g %% 4], (g * 13 %% 100000) / 10.0,
                  jsonb_build_object('newsletter', g %% 2 = 0)
           FROM generate_series(1, %s) AS g""",
        (all_days[0], days, days * 100),
    )
    conn.execute("DROP TABLE IF EXISTS public.payments")
    create_payments(conn)

    conn.execute("DROP TABLE IF EXISTS public.inventory CASCADE")
    conn.execute(
        """CREATE TABLE public.inventory (
               item_id integer PRIMARY KEY, sku text NOT NULL, qty integer NOT NULL,
               price numeric(10,2), note text, updated_at timestamptz NOT NULL DEFAULT now()
           )"""
    )
    conn.execute(
        """INSERT INTO public.inventory (item_id, sku, qty, price, note)
           SELECT g, 'SKU-' || g, (g * 37) % 500, round(((g * 7919) % 100000) / 100.0, 2),
                  CASE g % 4 WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN 'aisle 3, "top" shelf'
                              ELSE 'Lager Köln' END
           FROM generate_series(1, 500) AS g"""
    )
    conn.execute("ANALYZE")


def cdc_demo_changes(conn: psycopg.Connection, round_: int, transactions: int = 5) -> int:
    """A few transactions on public.inventory, as a shop would make them: stock moves
    (updates), new items (inserts), a discontinued item (delete), and now and then an item
    renumbered (an update of the key). Deterministic per `round_`; returns the transactions."""
    changes = 0
    for i in range(transactions):
        n = round_ * transactions + i
        with conn.transaction():
            conn.execute(
                "UPDATE public.inventory SET qty = qty + %s, updated_at = now()"
                " WHERE item_id %% 97 = %s",
                (n % 7 - 3, n % 97),
            )
            conn.execute(
                "INSERT INTO public.inventory (item_id, sku, qty, price, note)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (item_id) DO NOTHING",
                (100_000 + n, f"NEW-{n}", n % 50, (n % 1000) / 10, f'round {round_}, "new"'),
            )
            conn.execute("DELETE FROM public.inventory WHERE item_id = %s", (1 + n * 13 % 500,))
            if n % 5 == 0:
                conn.execute(
                    "UPDATE public.inventory SET item_id = %s WHERE item_id = %s AND NOT EXISTS"
                    " (SELECT FROM public.inventory WHERE item_id = %s)",
                    (200_000 + n, 100_000 + n, 200_000 + n),
                )
        changes += 1
    return changes
