"""Schema-qualified names as PostgreSQL parses them.

Config files name tables the way a user would type them in psql (`public.orders`,
`"Sales"."Order Lines"`), so we follow PostgreSQL's rules: unquoted parts fold to lower case
and may only hold identifier characters, quoted parts are taken literally with `""` as an
escaped quote. The result is only ever used through `psycopg.sql.Identifier`, so a quoted
name containing SQL is harmless; an unquoted one containing SQL is rejected outright.

For humans (logs, errors, manifests) names print the way PostgreSQL's own `quote_ident`
prints them: bare when they are lower-case identifier characters and not a keyword that
needs quoting, double-quoted otherwise. So `public.orders`, `"Sales Dept".ol_2024_03_09`
and `public."flights; DROP TABLE public.flights"` cannot be confused with one another, and
what is printed can be pasted into psql. (psycopg's `sql.Identifier` always quotes, which is
right for SQL and noisy for people.)
"""

import re
from dataclasses import dataclass

from psycopg import sql

_UNQUOTED = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_SAFE = re.compile(r"[a-z_][a-z0-9_]*")  # quote_identifier(): no `$`, no non-ASCII

# PostgreSQL 18's keywords whose category is not UNRESERVED (`SELECT word FROM
# pg_get_keywords() WHERE catcode <> 'U'`): quote_ident() quotes these. A test compares this
# set with the live server's.
QUOTED_KEYWORDS = frozenset(
    """
    all analyse analyze and any array as asc asymmetric authorization between bigint binary
    bit boolean both case cast char character check coalesce collate collation column
    concurrently constraint create cross current_catalog current_date current_role
    current_schema current_time current_timestamp current_user dec decimal default deferrable
    desc distinct do else end except exists extract false fetch float for foreign freeze from
    full grant greatest group grouping having ilike in initially inner inout int integer
    intersect interval into is isnull join json json_array json_arrayagg json_exists
    json_object json_objectagg json_query json_scalar json_serialize json_table json_value
    lateral leading least left like limit localtime localtimestamp merge_action national
    natural nchar none normalize not notnull null nullif numeric offset on only or order out
    outer overlaps overlay placing position precision primary real references returning right
    row select session_user setof similar smallint some substring symmetric system_user table
    tablesample then time timestamp to trailing treat trim true union unique user using values
    varchar variadic verbose when where window with xmlattributes xmlconcat xmlelement
    xmlexists xmlforest xmlnamespaces xmlparse xmlpi xmlroot xmlserialize xmltable
    """.split()
)


def quote_ident(name: str) -> str:
    """`name` as PostgreSQL's quote_ident() prints it (for messages, never for SQL)."""
    if _SAFE.fullmatch(name) and name not in QUOTED_KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, order=True)
class QualifiedName:
    schema: str
    name: str

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def display(self) -> str:
        """As PostgreSQL would print it: `public.orders`, `"Sales Dept".ol_2024_03_09`."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    def __str__(self) -> str:
        return self.display


def _parse_parts(text: str) -> list[str]:
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise ValueError(f"unterminated quoted identifier in {text!r}")
                buf.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':
                    buf.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            part = "".join(buf)
            if not part:
                raise ValueError(f"empty quoted identifier in {text!r}")
            parts.append(part)
        else:
            m = _UNQUOTED.match(text, i)
            if not m:
                raise ValueError(
                    f"{text!r} is not a valid name: unquoted identifiers may only contain "
                    'letters, digits, _ and $; use double quotes ("My Table") for anything else'
                )
            parts.append(m.group(0).lower())
            i = m.end()
        if i == n:
            return parts
        if text[i] != ".":
            raise ValueError(f"unexpected {text[i]!r} at position {i} in name {text!r}")
        i += 1


def parse_qualified_name(text: str, default_schema: str = "public") -> QualifiedName:
    """Parse `schema.table` (or a bare `table`, in `default_schema`)."""
    parts = _parse_parts(text.strip())
    if len(parts) == 1:
        return QualifiedName(default_schema, parts[0])
    if len(parts) == 2:
        return QualifiedName(parts[0], parts[1])
    raise ValueError(f"{text!r} has {len(parts)} dotted parts; expected schema.table")


def parse_column_name(text: str) -> str:
    parts = _parse_parts(text.strip())
    if len(parts) != 1:
        raise ValueError(f"{text!r} is not a single column name")
    return parts[0]
