"""Schema-qualified names as PostgreSQL parses them.

Config files name tables the way a user would type them in psql (`public.orders`,
`"Sales"."Order Lines"`), so we follow PostgreSQL's rules: unquoted parts fold to lower case
and may only hold identifier characters, quoted parts are taken literally with `""` as an
escaped quote. The result is only ever used through `psycopg.sql.Identifier`, so a quoted
name containing SQL is harmless; an unquoted one containing SQL is rejected outright.
"""

import re
from dataclasses import dataclass

from psycopg import sql

_UNQUOTED = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


@dataclass(frozen=True, order=True)
class QualifiedName:
    schema: str
    name: str

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


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
