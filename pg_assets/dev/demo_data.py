"""Demo tables that exercise every planner path with realistic, awkward data.

    public.orders      RANGE-partitioned by day on a date column, plus a DEFAULT partition
    public.events      RANGE-partitioned by month on a timestamptz column (Europe/Berlin days)
    public.customers   not partitioned, a date column
    public.payments    incremental by updated_at (see `pg_assets.dev.writer`)
    public.inventory   mode `cdc`: changes stream from the logical slot (`cdc_demo_changes`)

Rows are generated server-side with `generate_series`, so loading millions of rows (the
benchmark) costs seconds. Text columns carry commas, quotes, newlines, non-ASCII, NULLs and
empty strings, because those are what break hand-rolled CSV.

Volumes vary by day as real ones do (a weekly cycle, slow growth, noise, a Black Friday spike)
and are distinct from day to day, so a backfill shows each day's own row count. Every row is a
function of its day alone: reloading the demo with a later end day leaves earlier days' rows
(and so their Bronze files) unchanged.
"""

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence

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

ORDER_SELECT = """
    SELECT {id},
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
"""
ORDER_ROW = ORDER_SELECT.replace("{id}", "{id_base} + g") + (
    "    FROM generate_series(1, {rows}) AS g, (SELECT {day}::date AS d) AS day\n"
)
# Many days in one statement: `v` holds one row per day (its date, row count and id base).
ORDER_ROWS_BY_DAY = ORDER_SELECT.replace("{id}", "v.base + g") + (
    "    FROM unnest({days}::date[], {counts}::int[], {bases}::bigint[]) AS v(d, n, base),\n"
    "         generate_series(1, v.n) AS g\n"
)
ID_EPOCH = dt.date(2000, 1, 1)


def day_id_base(day: dt.date) -> int:
    """Ids that depend on the day alone, so a reload never renumbers an earlier day."""
    return (day - ID_EPOCH).days * 10_000_000


def _unit(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for `key` (no global RNG state)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _black_friday(year: int) -> dt.date:
    nov1 = dt.date(year, 11, 1)
    return nov1 + dt.timedelta(days=(4 - nov1.weekday()) % 7 + 21)


WEEKLY = (0.86, 0.93, 0.97, 1.0, 1.08, 1.22, 0.94)  # Monday .. Sunday


def daily_volumes(
    days: Sequence[dt.date], mean: int, salt: str = "orders", *, distinct: bool = True
) -> dict[dt.date, int]:
    """Rows per day around `mean`: a weekly cycle (Saturday busiest), slow growth (~5 % a
    year), ±15 % noise and Black Friday at 2.5x. With `distinct`, no two days share a count
    (a collision moves up by one, earliest day first, so adding days at the end never changes
    earlier counts): for small means, leave it off or the counts turn into a ramp."""
    out: dict[dt.date, int] = {}
    used: set[int] = set()
    for day in sorted(days):
        factor = WEEKLY[day.weekday()]
        factor *= 1 + 0.05 * ((day - ID_EPOCH).days / 365.25 - 26)  # 2026 = 1.0
        factor *= 0.85 + 0.3 * _unit(f"{salt}:{day.isoformat()}")
        if day == _black_friday(day.year):
            factor *= 2.5
        n = max(1, round(mean * factor))
        while distinct and n in used:
            n += 1
        used.add(n)
        out[day] = n
    return out


def insert_orders(
    conn: psycopg.Connection, table: sql.Composable, day: dt.date, rows: int, id_base: int
) -> None:
    q = sql.SQL("INSERT INTO {t} " + ORDER_ROW).format(
        t=table, id_base=sql.Literal(id_base), rows=sql.Literal(rows), day=sql.Literal(day)
    )
    conn.execute(q)


def insert_orders_by_day(
    conn: psycopg.Connection, table: sql.Composable, volumes: Mapping[dt.date, int]
) -> None:
    """Insert `volumes[day]` orders for each day in one statement (ids from `day_id_base`)."""
    days = sorted(volumes)
    q = sql.SQL("INSERT INTO {t} " + ORDER_ROWS_BY_DAY).format(
        t=table,
        days=sql.Literal(days),
        counts=sql.Literal([volumes[d] for d in days]),
        bases=sql.Literal([day_id_base(d) for d in days]),
    )
    conn.execute(q)


def create_daily_partitioned(
    conn: psycopg.Connection,
    schema: str,
    name: str,
    days: list[dt.date],
    rows_per_day: int | Mapping[dt.date, int],
    *,
    default_partition: bool = True,
) -> None:
    """A table RANGE-partitioned by day on `order_date`, one child per day in `days`.

    `rows_per_day` is one count for every day, or a count per day (see `daily_volumes`)."""
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
    if isinstance(rows_per_day, int):
        for i, day in enumerate(days):
            insert_orders(conn, parent, day, rows_per_day, id_base=i * 10_000_000)
    else:
        insert_orders_by_day(conn, parent, {d: rows_per_day[d] for d in days})


DEMO_START = dt.date(2026, 10, 1)


def demo_end(today: dt.date | None = None) -> dt.date:
    """The demo's last day: yesterday, so the daily schedule's next day is the first missing."""
    return (today or dt.date.today()) - dt.timedelta(days=1)


def demo_loaded_through(conn: psycopg.Connection) -> dt.date | None:
    """The last day of the loaded demo (recorded in a table comment), None when not loaded."""
    row = conn.execute(
        "SELECT obj_description(to_regclass('public.orders'), 'pg_class')"
    ).fetchone()
    text = row[0] if row else None
    if not text or not text.startswith("pg_assets demo through "):
        return None
    return dt.date.fromisoformat(text.removeprefix("pg_assets demo through "))


def load_demo(
    conn: psycopg.Connection,
    end: dt.date,
    days: int | None = None,
    rows_per_day: int = 2000,
) -> None:
    """(Re)create the three demo tables with `days` days up to and including `end`
    (default: from DEMO_START). Orders average `rows_per_day`, events about 1.2x that, new
    customers a twentieth; each day's count is its own (see `daily_volumes`)."""
    first = end - dt.timedelta(days=days - 1) if days else min(DEMO_START, end)
    all_days = [first + dt.timedelta(days=n) for n in range((end - first).days + 1)]
    orders = daily_volumes(all_days, rows_per_day, "orders")
    create_daily_partitioned(conn, "public", "orders", all_days, orders)
    # a late order that lands in DEFAULT: the day after the last daily partition (today)
    insert_orders(
        conn, sql.Identifier("public", "orders"), end + dt.timedelta(days=1), 10, 9_000_000_000
    )
    conn.execute(
        sql.SQL("COMMENT ON TABLE public.orders IS {}").format(
            sql.Literal(f"pg_assets demo through {end.isoformat()}")
        )
    )

    conn.execute("DROP TABLE IF EXISTS public.events CASCADE")
    conn.execute(
        """CREATE TABLE public.events (
               event_id bigint, occurred_at timestamptz NOT NULL, kind text, payload jsonb,
               score double precision, ok boolean, ref uuid
           ) PARTITION BY RANGE (occurred_at)"""
    )
    month = all_days[0].replace(day=1)
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
    # Each Berlin day's events spread evenly over its 23, 24 or 25 hours.
    events = daily_volumes(all_days, round(rows_per_day * 1.2), "events")
    conn.execute(
        """INSERT INTO public.events
           SELECT v.base + g, lo + (hi - lo) * g / v.n,
                  (ARRAY['click','view','buy'])[1 + g %% 3],
                  jsonb_build_object('path', '/p/' || g %% 500, 'ua', 'Mozilla/5.0 "x"'),
                  (g %% 1000) / 7.0, g %% 2 = 0, md5((v.base + g)::text)::uuid
           FROM unnest(%s::date[], %s::int[], %s::bigint[]) AS v(d, n, base),
                LATERAL (SELECT v.d::timestamp AT TIME ZONE 'Europe/Berlin' AS lo,
                                (v.d + 1)::timestamp AT TIME ZONE 'Europe/Berlin' AS hi) AS b,
                generate_series(0, v.n - 1) AS g""",
        (all_days, [events[d] for d in all_days], [day_id_base(d) for d in all_days]),
    )

    conn.execute("DROP TABLE IF EXISTS public.customers CASCADE")
    conn.execute(
        """CREATE TABLE public.customers (
               customer_id bigint PRIMARY KEY, signup_date date NOT NULL, name text,
               email text, country char(2), lifetime_value numeric(14,2), prefs jsonb,
               updated_at timestamptz
           )"""
    )
    signups = daily_volumes(all_days, max(1, rows_per_day // 20), "customers", distinct=False)
    conn.execute(
        """INSERT INTO public.customers (customer_id, signup_date, name, email, country,
                                         lifetime_value, prefs, updated_at)
           SELECT v.base + g, v.d,
                  'Customer ' || g || CASE WHEN g %% 9 = 0 THEN ', Jr.' ELSE '' END,
                  CASE WHEN g %% 13 = 0 THEN NULL ELSE 'c' || (v.base + g) || '@example.com' END,
                  (ARRAY['DE','FR','JP','US'])[1 + g %% 4], (g * 13 %% 100000) / 10.0,
                  jsonb_build_object('newsletter', g %% 2 = 0),
                  (v.d + interval '36 hours' + g * interval '1 minute') AT TIME ZONE 'UTC'
           FROM unnest(%s::date[], %s::int[], %s::bigint[]) AS v(d, n, base),
                generate_series(1, v.n) AS g""",
        (all_days, [signups[d] for d in all_days], [day_id_base(d) // 1000 for d in all_days]),
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
