"""The PostgreSQL session every pg_assets connection uses: settings pinned at connect time.

COPY's text output is rendered by each type's output function, and several of those read
session settings. A role or database may carry its own (`ALTER ROLE reader SET DateStyle =
'SQL, DMY'`), so without pinning, the same rows land in Bronze as different bytes depending
on who extracted them, and the planner cannot read the partition bounds back. We pin them in
the libpq startup `options`: settings sent there have source "client", which outranks
`ALTER ROLE/DATABASE ... SET` and postgresql.conf, and they hold for the whole session.

What each pin protects (PostgreSQL 18, `src/backend/utils/adt/*out*` and `guc_tables.c`):

    DateStyle=ISO, MDY        date, timestamp, timestamptz, timetz text (`10/03/2024` under
                              'SQL, DMY'); psycopg also parses only ISO timestamptz
    TimeZone=UTC              timestamptz values (`+05:30` under Asia/Kolkata)
    IntervalStyle=postgres    interval text (`P1D`, `+0-0 +1 +0:00:00` under other styles)
    extra_float_digits=1      float4/float8 and geometric types: shortest exact text (0 or
                              lower rounds to 15/6 significant digits and loses information)
    bytea_output=hex          bytea text (`\\x..` vs octal escapes)
    lc_monetary=C             money text (currency symbol, separators)
    client_encoding=UTF8      the bytes of every text value (Bronze is UTF-8)
    quote_all_identifiers=off regclass/regtype/regproc… text and format_type() (manifest
                              column types)
    row_security=off          a role subject to row-level security would otherwise get a
                              silently filtered file; with it off PostgreSQL raises "query
                              would be affected by row-level security policy" (as pg_dump
                              does). Owners and BYPASSRLS roles are unaffected.
    synchronize_seqscans=off  a plain COPY of a large table may otherwise start mid-table
                              when another scan of it is running: same rows, other order,
                              other bytes and sha256 for an unchanged day

Checked and deliberately not pinned: `xmloption`/`xmlbinary` (affect XML input and XML
functions, not xml_out), `lc_numeric`/`lc_time` (to_char only), `timezone_abbreviations`
(input only; ISO output uses numeric offsets), `search_path` (changes the text of reg* types
for objects outside it, but pinning it would change how functions called by a configured
view resolve names; our own statements are fully qualified). Parallel query can also change
the row order of a `COPY (SELECT …)`; it is left to the server because it is what makes the
parent_filter scan of a large table fast.

All pinned settings are user-settable (PGC_USERSET), so any role may send them.
"""

import os

import psycopg

APPLICATION_NAME = "pg_assets"

# Values exactly as `SHOW` / current_setting() prints them, so they can be compared.
PINNED_SETTINGS: dict[str, str] = {
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "client_encoding": "UTF8",
    "quote_all_identifiers": "off",
    "row_security": "off",
    "synchronize_seqscans": "off",
}


# Not output settings, so neither checked nor recorded: a server-wide `idle_session_timeout`
# would end the session that holds a day's lock while the day's upload runs, and the lock
# with it.
_SESSION_GUARDS: dict[str, str] = {"idle_session_timeout": "0"}

# TCP settings that bound how long a silent network partition can stall a run (Linux's own
# keepalive defaults would let libpq wait over two hours); any the conninfo sets win.
NETWORK_DEFAULTS: dict[str, str] = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",  # ms unacknowledged before the connection is given up
}


class MissingConninfoError(RuntimeError):
    pass


def read_conninfo(env_var: str) -> str:
    value = os.environ.get(env_var)
    if not value:
        raise MissingConninfoError(
            f"environment variable {env_var} is not set; it must hold the PostgreSQL "
            "connection string (e.g. 'host=db.example.com dbname=shop user=reader')"
        )
    return value


class SessionSettingsError(RuntimeError):
    """The server is not using the pinned settings (e.g. a pooler dropped `options`)."""


def _escape_option(value: str) -> str:
    # libpq splits `options` on unescaped whitespace; a backslash escapes the next character.
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def session_options(statement_timeout_s: float = 0, lock_timeout_s: float = 0) -> str:
    """The `-c name=value …` string for libpq's startup `options`."""
    settings = {**PINNED_SETTINGS, **_SESSION_GUARDS}
    if statement_timeout_s:
        settings["statement_timeout"] = str(int(statement_timeout_s * 1000))
    if lock_timeout_s:
        settings["lock_timeout"] = str(max(1, int(lock_timeout_s * 1000)))
    return " ".join(f"-c {k}={_escape_option(v)}" for k, v in settings.items())


def _user_options(conninfo: str) -> str:
    """Options the user asked for in the conninfo (or PGOPTIONS): kept, ours come after."""
    try:
        given = psycopg.conninfo.conninfo_to_dict(conninfo).get("options")
    except psycopg.ProgrammingError:
        given = None  # a malformed conninfo fails at connect with libpq's own message
    if given is None:
        given = os.environ.get("PGOPTIONS")
    return str(given or "").strip()


def connect_kwargs(
    connect_timeout_s: float,
    statement_timeout_s: float,
    conninfo: str = "",
    *,
    lock_timeout_s: float = 0,
) -> dict[str, object]:
    """Keyword arguments for `psycopg.connect(conninfo, **kwargs)` / the pool's `kwargs`.

    Passing `options` replaces any `options` in the conninfo (and PGOPTIONS), so pass the
    conninfo here to keep the user's own options (e.g. a Neon `endpoint=` id); for the same
    setting ours win because later `-c` options override earlier ones. `lock_timeout_s`
    bounds every lock wait of the session (e.g. the load-time catalog read, which briefly
    locks each partition to read its bounds); 0 leaves the server's setting.
    """
    options = session_options(statement_timeout_s, lock_timeout_s)
    user = _user_options(conninfo)
    try:
        given = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        given = {}  # a malformed conninfo fails at connect with libpq's own message
    return {
        **{k: v for k, v in NETWORK_DEFAULTS.items() if k not in given},
        "application_name": APPLICATION_NAME,
        "connect_timeout": max(1, int(connect_timeout_s)),
        "options": f"{user} {options}" if user else options,
    }


SETTINGS_SQL = "SELECT " + ", ".join(
    f"pg_catalog.current_setting('{name}')" for name in PINNED_SETTINGS
)


def check_settings(values: tuple[str, ...] | list[str]) -> None:
    """Raise if `values` (SETTINGS_SQL's row) differ from the pinned ones."""
    wrong = [
        f"{name} is {got!r}, expected {want!r}"
        for (name, want), got in zip(PINNED_SETTINGS.items(), values, strict=True)
        if got != want
    ]
    if wrong:
        raise SessionSettingsError(
            "the PostgreSQL session does not use pg_assets' pinned settings ("
            + "; ".join(wrong)
            + "): connect with pg_assets' connect_kwargs, and if a connection pooler sits in "
            "between, let it pass the startup 'options' parameter"
        )


def check_session(conn: psycopg.Connection) -> None:
    """One query: the session really uses PINNED_SETTINGS."""
    row = conn.execute(SETTINGS_SQL).fetchone()
    check_settings(tuple(row or ()))
