"""Which Delta table a configured value names: a storage path or a metastore name (the config's vocabulary, so
it sits below both the config and the table primitives)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def table_kind(value: str) -> Literal["path", "name"]:
    """Whether a configured table is a storage path or a metastore name; ValueError when it can be neither.

    A path has a URI scheme (``s3://``, ``file:``), a ``/``, starts with ``.`` or ``~``, or is one word without a
    dot (a relative folder, as before names were supported). Anything else has a dot and no ``/``: a name of two or
    three identifiers (``db.table``, ``catalog.schema.table``; letters, digits and ``_``, not starting with a
    digit). A dotted value that is not such a name (``my-data.v1``, ``a..b``, four parts) is refused, not guessed.
    """
    from image_embeddings.core.uri import scheme

    text = value.strip()
    if scheme(text) is not None or "/" in text or text.startswith((".", "~")) or "." not in text:
        return "path"
    parts = text.split(".")
    if 2 <= len(parts) <= 3 and all(_IDENTIFIER.fullmatch(p) for p in parts):
        return "name"
    raise ValueError(f"{value!r} is neither a storage path nor a metastore table name: a value with a '.' and no "
                     "'/' names a table (db.table or catalog.schema.table, each part letters, digits and '_'); "
                     f"write ./{text} for a local folder")


@dataclass(frozen=True)
class TableRef:
    """One Delta table: by storage path, or by metastore name (managed, or external at ``location``)."""

    value: str                          # the path or the name, as configured
    kind: Literal["path", "name"] = "path"
    location: str | None = None         # a named table's external location; None: managed by the catalog

    @classmethod
    def of(cls, value: str, location: str | None = None) -> TableRef:
        """The reference ``value`` stands for (:func:`table_kind`); ``location`` only for a name."""
        kind = table_kind(value)
        if kind == "path" and location is not None:
            raise ValueError(f"{value!r} is a storage path: a location applies to a table by name only")
        return cls(value.strip(), kind, location)

    @property
    def is_name(self) -> bool:
        """True for a metastore name."""
        return self.kind == "name"

    @property
    def sql(self) -> str:
        """The table in Spark SQL: ``delta.`file:/abs/path``` (a relative path there would be read as a table
        name in a database called ``delta``, so it is made absolute and qualified), or ```db`.`table```."""
        if self.is_name:
            return ".".join(f"`{part}`" for part in self.value.split("."))
        from image_embeddings.core.uri import qualify

        return "delta.`" + qualify(self.value).replace("`", "``") + "`"

    @property
    def storage(self) -> str | None:
        """Where the table's files are, as configured: the path, or a named table's external location; None for a
        managed table (the catalog chooses; :func:`table_location` asks it)."""
        return self.location if self.is_name else self.value

    def suffixed(self, suffix: str) -> str:
        """The value of a table named after this one (``<images_table>_files``): the same kind, ``suffix`` added."""
        return self.value.rstrip("/") + suffix

    def __str__(self) -> str:
        return self.value


Table = str | TableRef  # a configured value, or its reference


def table_ref(table: Table) -> TableRef:
    """``table`` as a :class:`TableRef` (a string is parsed by :func:`table_kind`)."""
    return table if isinstance(table, TableRef) else TableRef.of(table)


__all__ = ["Table", "TableRef", "table_kind", "table_ref"]
