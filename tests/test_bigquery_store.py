"""The BigQuery profile store where no BigQuery can be reached: its schema, its row conversion and
its MERGE-by-version statement (the write itself is Beam's WriteToBigQuery)."""

from __future__ import annotations

import pytest

from tests.test_profile_stores import row, tomb
from transforms.io.bigquery import (
    latest_view_sql,
    merge_sql,
    table_of,
    table_schema,
    to_bigquery_row,
)
from transforms.profile_store import PROFILE_COLUMNS, StoreSpec


def test_the_schema_has_every_profile_column_with_its_type():
    fields = {f["name"]: f for f in table_schema()["fields"]}
    assert set(fields) == set(PROFILE_COLUMNS) | {"deleted"}
    assert fields["identities"]["mode"] == "REPEATED"
    assert [f["name"] for f in fields["identities"]["fields"]] == [
        "type", "value", "first_seen", "last_seen",
    ]  # fmt: skip
    assert fields["traits"]["type"] == "JSON" and fields["version"]["type"] == "INT64"
    assert fields["updated_at"]["type"] == "TIMESTAMP"
    assert fields["profile_id"]["mode"] == fields["version"]["mode"] == "REQUIRED"


def test_rows_and_tombstones_convert_to_the_schema():
    r = row("user:u1", 5, "user_id:u1", "email:a@x.io")
    out = to_bigquery_row(r)
    schema = {f["name"] for f in table_schema()["fields"]}
    assert set(out) <= schema
    assert out["identities"][0] == {
        "type": "email", "value": "a@x.io", "first_seen": None, "last_seen": None,
    }  # fmt: skip
    assert out["traits"] == r["traits"] and out["deleted"] is False and out["version"] == 5
    assert to_bigquery_row(tomb("user:u1", 9)) == {
        "profile_id": "user:u1", "version": 9, "deleted": True,
    }  # fmt: skip
    with pytest.raises(TypeError):
        to_bigquery_row({**r, "version": "5"})


def test_merge_keeps_the_highest_version_and_deletes_on_tombstones():
    sql = merge_sql("proj", "cdi", "profiles")
    assert "`proj.cdi.profiles_changes`" in sql and "MERGE `proj.cdi.profiles` T" in sql
    assert "PARTITION BY profile_id ORDER BY version DESC) = 1" in sql
    assert "WHEN MATCHED AND S.version > T.version AND S.deleted THEN DELETE" in sql
    assert "WHEN NOT MATCHED AND NOT S.deleted THEN INSERT" in sql
    for c in PROFILE_COLUMNS:
        assert f"S.{c}" in sql
    assert "AND NOT deleted" in latest_view_sql("proj", "cdi", "profiles")


def test_url_names_project_dataset_and_table():
    assert table_of(StoreSpec("bigquery", url="bigquery://proj/cdi.profiles")) == (
        "proj", "cdi", "profiles",
    )  # fmt: skip
    with pytest.raises(ValueError):
        table_of(StoreSpec("bigquery", url="bigquery://proj/cdi"))


def test_the_job_with_a_bigquery_store_builds_a_dataflow_job_offline():
    """The whole write (Beam's WriteToBigQuery into the change table) built into a Dataflow job
    without a network: the graph names the change table's load steps."""
    pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient")
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import governed_profiles as job
    from tests.conftest import config_from
    from tests.test_dataflow import DATAFLOW

    cfg = config_from(
        "sources: [{name: web}]\n"
        "sinks: {profiles: {type: bigquery, url: 'bigquery://demo-project/cdi.profiles'}}\n"
    )
    p = beam.Pipeline(options=PipelineOptions(DATAFLOW))
    job.write_outputs(job.build(p, cfg, {"web": ["gs://b/in/*.ndjson"]}), cfg, "gs://b/out")
    p.run()
    names = [t.unique_name for t in p.runner.proto_pipeline.components.transforms.values()]
    assert any("WriteProfiles[bigquery:0]/Write/Append" in n for n in names)
    assert any("ToBigQueryRow" in n for n in names)
