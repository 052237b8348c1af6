"""BigQuery profile store: Beam's ``WriteToBigQuery`` into a change table, merged by version.

BigQuery has no row-level upsert on insert, so the job appends every row version (and every
tombstone, ``deleted = TRUE``) to ``<table>_changes``; :func:`merge_sql` is the statement a
scheduled query runs to bring ``<table>`` to each profile's highest version (the store contract
of :mod:`transforms.profile_store`: an older version never replaces a newer one, a tombstone
deletes, a re-run adds rows the MERGE ignores). :func:`latest_view_sql` is a view that reads the
newest live version straight from the change table, for readers that cannot wait for the MERGE.

``url``: ``bigquery://project/dataset.table``. The schema is generated from the profile columns
(:func:`table_schema`): identities as a repeated record, the JSON columns as ``JSON``, times as
``TIMESTAMP``, partitioned by ``updated_at`` day and clustered by ``profile_id``.

Not verifiable here: no BigQuery can be reached from this machine and there is no emulator. The
schema, the row conversion and the MERGE text are tested, and the job with this store is built
into a Dataflow job offline; the write itself is Beam's. Reads
(``cdi profile get``/``serve``) are not offered for BigQuery: serve from PostgreSQL or Redis.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import apache_beam as beam
import orjson

from transforms.profile_store import JSON_COLUMNS, StoreSpec, check_row

_TIMES = ("first_seen", "last_seen", "updated_at")


def table_of(spec: StoreSpec) -> tuple[str, str, str]:
    """``bigquery://project/dataset.table`` -> (project, dataset, table)."""
    parts = urlsplit(spec.resolved_url())
    dataset, _, table = parts.path.lstrip("/").partition(".")
    if parts.scheme != "bigquery" or not parts.netloc or not dataset or not table:
        raise ValueError("a bigquery store's url is bigquery://project/dataset.table")
    return parts.netloc, dataset, table


def table_schema() -> dict:
    """The change table's schema (``WriteToBigQuery``'s dict form)."""
    fields = [{"name": "profile_id", "type": "STRING", "mode": "REQUIRED"}]
    fields.append(
        {
            "name": "identities",
            "type": "RECORD",
            "mode": "REPEATED",
            "fields": [
                {"name": "type", "type": "STRING", "mode": "REQUIRED"},
                {"name": "value", "type": "STRING", "mode": "REQUIRED"},
                {"name": "first_seen", "type": "TIMESTAMP", "mode": "NULLABLE"},
                {"name": "last_seen", "type": "TIMESTAMP", "mode": "NULLABLE"},
            ],
        }
    )
    fields += [
        {"name": c, "type": "JSON", "mode": "NULLABLE"} for c in JSON_COLUMNS if c != "identities"
    ]
    fields += [{"name": c, "type": "TIMESTAMP", "mode": "NULLABLE"} for c in _TIMES]
    fields += [
        {"name": "version", "type": "INT64", "mode": "REQUIRED"},
        {"name": "deleted", "type": "BOOL", "mode": "REQUIRED"},
    ]
    return {"fields": fields}


def to_bigquery_row(row: dict) -> dict:
    """A checked profile row or tombstone as a change-table row (JSON columns as JSON text,
    which is how ``WriteToBigQuery`` takes a ``JSON`` column; empty times as NULL)."""
    check_row(row)
    if row.get("deleted"):
        return {"profile_id": row["profile_id"], "version": row["version"], "deleted": True}
    out = {"profile_id": row["profile_id"], "version": row["version"], "deleted": False}
    out["identities"] = orjson.loads(row["identities"])
    for c in JSON_COLUMNS:
        if c != "identities":
            out[c] = row[c]
    for c in _TIMES:
        out[c] = row[c] or None
    return out


def _columns() -> list[str]:
    return [f["name"] for f in table_schema()["fields"] if f["name"] != "deleted"]


def merge_sql(project: str, dataset: str, table: str) -> str:
    """Bring ``table`` to each profile's highest version in ``table_changes``."""
    target, changes = f"`{project}.{dataset}.{table}`", f"`{project}.{dataset}.{table}_changes`"
    cols = _columns()
    sets = ", ".join(f"{c} = S.{c}" for c in cols if c != "profile_id")
    return (
        f"MERGE {target} T USING (\n"
        f"  SELECT * FROM {changes}\n"
        "  QUALIFY ROW_NUMBER() OVER (PARTITION BY profile_id ORDER BY version DESC) = 1\n"
        ") S ON T.profile_id = S.profile_id\n"
        "WHEN MATCHED AND S.version > T.version AND S.deleted THEN DELETE\n"
        f"WHEN MATCHED AND S.version > T.version THEN UPDATE SET {sets}\n"
        f"WHEN NOT MATCHED AND NOT S.deleted THEN INSERT ({', '.join(cols)}) "
        f"VALUES ({', '.join('S.' + c for c in cols)})"
    )


def latest_view_sql(project: str, dataset: str, table: str) -> str:
    changes = f"`{project}.{dataset}.{table}_changes`"
    return (
        f"CREATE OR REPLACE VIEW `{project}.{dataset}.{table}_latest` AS\n"
        f"SELECT * EXCEPT (deleted) FROM {changes}\n"
        "WHERE TRUE QUALIFY ROW_NUMBER() OVER (PARTITION BY profile_id ORDER BY version DESC) = 1"
        " AND NOT deleted"
    )


class WriteProfilesToBigQuery(beam.PTransform):
    """Rows to the change table; returns the dead letters (rows that are not rows). Needs
    ``apache-beam[gcp]`` (the project's ``gcp`` extra) where the pipeline is built."""

    def __init__(self, spec: StoreSpec):
        super().__init__()
        self._table = table_of(spec)

    def expand(self, rows):
        from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery

        from transforms.dead_letter import FAILED, guarded, one_or_dead_letter

        project, dataset, table = self._table
        converted = rows | "ToBigQueryRow" >> guarded(
            beam.FlatMap(one_or_dead_letter(to_bigquery_row))
        )
        converted.good | "Append" >> WriteToBigQuery(
            table=f"{project}:{dataset}.{table}_changes",
            schema=table_schema(),
            create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
            write_disposition=BigQueryDisposition.WRITE_APPEND,
            additional_bq_parameters={
                "timePartitioning": {"type": "DAY", "field": "updated_at"},
                "clustering": {"fields": ["profile_id"]},
            },
        )
        return converted[FAILED]


write_transform = WriteProfilesToBigQuery


class Store:
    def __init__(self, spec: StoreSpec):
        raise NotImplementedError("BigQuery is written by WriteToBigQuery (write_transform)")


class Reader:
    def __init__(self, spec: StoreSpec, pool_size: int = 8):
        raise ValueError(
            "BigQuery is not a lookup store: serve profiles from PostgreSQL, Redis or SQLite"
        )
