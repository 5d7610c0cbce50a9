"""Unit tests for image_embeddings.config (pure Python: no Spark, no S3 server)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from image_embeddings.cli import main
from image_embeddings.config import (
    AppConfig,
    ConfigError,
    MaintenanceConfig,
    OutputConfig,
    PreprocessConfig,
    load_config,
    parse_override,
)
from image_embeddings.images import DEFAULT_EXTENSIONS
from image_embeddings.report import redact
from image_embeddings.uri import qualify

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
LOCAL = CONF / "local.yaml"


def _minimal() -> dict[str, Any]:
    """The smallest valid configuration, as plain data."""
    return {
        "input": {"images": "data/images", "sales": "data/sales"},
        "output": {"images_table": "t/images", "embeddings_table": "t/embeddings", "runs_table": "t/runs"},
    }


def _load(*overrides: str, data: dict[str, Any] | None = None) -> AppConfig:
    return load_config(None, overrides, data=_minimal() if data is None else data)


def _error(*overrides: str, data: dict[str, Any] | None = None) -> str:
    """Load a config that must be refused and return the ConfigError message."""
    with pytest.raises(ConfigError) as info:
        _load(*overrides, data=data)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------
# the shipped config files


def test_local_yaml_loads_and_validates() -> None:
    config = load_config(LOCAL)
    assert config.input.images == "demo/sample/images"
    assert config.input.sales == "demo/sample/sales"
    assert config.input.extensions == ("jpg", "jpeg", "png", "webp")
    assert config.input.image_id_pattern == r"^(.+)\.[^.]+$"
    assert config.input.max_file_bytes == 64 * 1024 * 1024
    assert config.input.join == "inner"
    assert config.input.track_deletions is True
    assert config.output.files_table is None
    assert config.output.files_table_path == "demo/delta/images_files"
    assert config.preprocess == PreprocessConfig(size=224, mode="center_crop", crop_fraction=0.875,
                                                 jpeg_quality=90, max_pixels=100_000_000)
    assert config.spark.master == "local[2]"
    assert config.spark.packages == ("io.delta:delta-spark_2.13:4.0.1",)
    assert config.spark.s3_packages == ("org.apache.hadoop:hadoop-aws:3.4.1",)
    assert config.spark.conf["spark.sql.shuffle.partitions"] == "4"
    assert config.spark.conf["spark.driver.memory"] == "4g"
    assert config.spark.conf["spark.ui.enabled"] == "false"
    assert config.s3.path_style_access is True
    assert config.s3.map_s3_scheme is True
    assert config.s3.endpoint is None


def test_emr_yaml_loads_and_validates() -> None:
    config = load_config(CONF / "emr.yaml", run_date="2026-11-23")
    assert config.input.images == "s3://my-bucket/raw-images/2026-11-23"
    assert config.input.join == "inner"
    assert config.input.extensions == DEFAULT_EXTENSIONS
    assert config.output.runs_table == "s3://my-bucket/delta/runs"
    assert config.output.files_table_path == "s3://my-bucket/delta/images_files"
    assert config.preprocess.size == 224
    assert config.spark.master is None
    assert config.spark.packages == ()
    assert config.spark.conf == {"spark.sql.shuffle.partitions": "200",
                                 "spark.sql.files.maxPartitionBytes": "64m"}
    assert config.s3.map_s3_scheme is False
    assert config.maintenance == MaintenanceConfig(vacuum_retention_hours=168, optimize=True)


def test_databricks_yaml_loads_and_validates() -> None:
    config = load_config(CONF / "databricks.yaml", run_date="2026-11-23")
    assert config.input.images == "s3://my-bucket/raw-images/2026-11-23"
    assert config.input.sales == "s3://my-bucket/sales-data"
    assert config.output.embeddings_table == "s3://my-bucket/delta/image-embeddings"
    assert config.output.files_table_path == "s3://my-bucket/delta/images_files"
    assert config.preprocess.mode == "center_crop"
    assert config.spark.conf == {}
    assert config.spark.arrow_max_records_per_batch == 32
    assert config.s3.map_s3_scheme is False
    assert config.maintenance == MaintenanceConfig(vacuum_retention_hours=168, optimize=True)


@pytest.mark.parametrize("name", ["emr.yaml", "databricks.yaml"])
def test_cluster_configs_read_one_day_and_need_a_run_date(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONF / name)
    assert str(info.value) == "input.images: contains {run_date}; pass --run-date YYYY-MM-DD"
    # Commands that read no input (maintain, check-config) keep the placeholder instead.
    assert load_config(CONF / name, needs_input=False).input.images == "s3://my-bucket/raw-images/{run_date}"
    assert load_config(CONF / name, run_date="2026-11-24", needs_input=False).input.images == (
        "s3://my-bucket/raw-images/2026-11-24")


def test_defaults_of_minimal_config() -> None:
    config = _load()
    assert config.input.extensions == DEFAULT_EXTENSIONS
    assert config.input.sales_key == "image_id"
    assert config.preprocess == PreprocessConfig()
    assert config.spark.app_name == "image-embeddings"
    assert config.s3.ssl is True
    assert config.s3.max_attempts == 5
    assert config.maintenance == MaintenanceConfig(vacuum_retention_hours=168, optimize=True)


def test_files_table_path_strips_trailing_slash_and_explicit_value_wins() -> None:
    out = OutputConfig(images_table="s3://b/t/images/", embeddings_table="e", runs_table="r")
    assert out.files_table_path == "s3://b/t/images_files"
    explicit = OutputConfig(images_table="i", embeddings_table="e", runs_table="r", files_table="s3://b/f")
    assert explicit.files_table_path == "s3://b/f"


# ---------------------------------------------------------------------------------------------------------
# tables by path or by name


@pytest.mark.parametrize(("value", "kind"), [
    ("s3://bucket/delta/images", "path"), ("s3a://bucket/images.v2", "path"), ("file:/data/shop.images", "path"),
    ("/Volumes/main/shop/data/images", "path"), ("t/images", "path"), ("./shop.images", "path"),
    ("../shop.images", "path"), ("~/shop.images", "path"), ("images", "path"),
    ("shop.images", "name"), ("main.shop.images", "name"), ("_raw.Images_2", "name"),
])
def test_a_table_is_a_path_or_a_name_by_one_rule(value: str, kind: str) -> None:
    from image_embeddings.tables import table_kind

    assert table_kind(value) == kind
    # Normalized, a path stays a path: ./shop.images must not turn into the name shop.images.
    config = _load(f"output.embeddings_table={value}")
    assert config.output.embeddings.kind == kind and config.output.embeddings.value == config.output.embeddings_table


@pytest.mark.parametrize("value", ["my-data.v1", "shop..images", "a.b.c.d", "1shop.images", "shop.images.", "x.y-z"])
def test_a_dotted_value_that_is_no_name_is_refused_naming_the_key(value: str) -> None:
    message = _error(f"output.images_table={value}")
    assert message.startswith(f"output.images_table: {value!r} is neither a storage path nor a metastore table name")
    assert f"write ./{value} for a local folder" in message and "\n" not in message
    assert _error(f"index.neighbours_table={value}").startswith("index.neighbours_table: ")


def test_named_tables_sql_derived_names_and_external_locations() -> None:
    config = _load("output.images_table=shop.images", "output.embeddings_table=main.shop.embeddings",
                   "output.runs_table=s3://b/runs", "output.locations.shop.images_files=s3://b/files/",
                   "output.locations.main.shop.embeddings=/Volumes/main/shop/data/embeddings")
    out = config.output
    assert (out.images.sql, out.embeddings.sql) == ("`shop`.`images`", "`main`.`shop`.`embeddings`")
    assert out.runs.sql == "delta.`s3://b/runs`" and not out.runs.is_name
    assert (out.files.value, out.files.location) == ("shop.images_files", "s3://b/files")
    assert (out.images.location, out.embeddings.storage) == (None, "/Volumes/main/shop/data/embeddings")
    assert config.index.neighbours_for(out.embeddings_table) == "main.shop.embeddings_neighbours"
    # What is files rather than a table: beside an external location, or configured for a managed table.
    assert config.index.location_for(out.embeddings) == "/Volumes/main/shop/data/embeddings_index"
    with pytest.raises(ConfigError, match=r"^lease.location: shop.images is a managed metastore table.*set "
                                          r"lease.location to a file on storage"):
        config.lease.location_for(out.images)
    leased = _load("output.images_table=shop.images", "lease.location=s3://b/lease.json")
    assert leased.lease.location_for(leased.output.images) == "s3://b/lease.json"
    path = _load()
    assert path.lease.location_for(path.output.images) == "t/images_lease.json"
    assert path.index.location_for(path.output.embeddings) == "t/embeddings_index"


def test_locations_only_for_this_configs_named_tables_and_only_storage() -> None:
    assert _error("output.locations.shop.other=s3://b/x", "output.images_table=shop.images").startswith(
        "output.locations.shop.other: not a table this config names (tables by name here: shop.images, "
        "shop.images_files)")
    assert _error("output.locations.t/images=s3://b/x").startswith("output.locations.t/images: not a table")
    assert _error("output.images_table=shop.images", "output.locations.shop.images=other.table") == (
        "output.locations.shop.images: expected a storage location (s3://bucket/path, /Volumes/..., ./folder), "
        "got 'other.table'")
    assert "credentials must not be embedded" in _error(
        "output.images_table=shop.images", "output.locations.shop.images=s3a://AKIA:secret@b/x")
    # Names compare as the catalogs compare them: without regard to case.
    config = _load("output.images_table=Shop.Images", "output.locations.shop.images=s3://b/x")
    assert config.output.images.location == "s3://b/x"


# ---------------------------------------------------------------------------------------------------------
# --set overrides


def test_override_scalar_bool_int() -> None:
    config = load_config(LOCAL, ["input.join=left", "input.track_deletions=false", "preprocess.size=160",
                                 "input.sales=s3a://bucket/sales", "s3.endpoint=http://127.0.0.1:9000"])
    assert config.input.join == "left"
    assert config.input.track_deletions is False
    assert config.preprocess.size == 160
    assert config.input.sales == "s3a://bucket/sales"
    assert config.s3.endpoint == "http://127.0.0.1:9000"


def test_override_value_may_contain_equals_sign() -> None:
    assert parse_override("spark.app_name=a=b") == ("spark.app_name", "a=b")


def test_override_list_yaml_and_comma_string() -> None:
    assert load_config(LOCAL, ["input.extensions=[jpg,png]"]).input.extensions == ("jpg", "png")
    assert load_config(LOCAL, ["input.extensions=jpg,png"]).input.extensions == ("jpg", "png")
    assert load_config(LOCAL, ["input.extensions= jpg , png ,"]).input.extensions == ("jpg", "png")


def test_override_later_wins() -> None:
    assert _load("input.join=left", "input.join=inner").input.join == "inner"


def test_override_nested_spark_conf() -> None:
    config = load_config(LOCAL, ["spark.conf.spark.sql.shuffle.partitions=8",
                                 "spark.conf.spark.ui.enabled=true", "spark.conf.spark.local.dir=/tmp/x"])
    assert config.spark.conf["spark.sql.shuffle.partitions"] == "8"
    assert config.spark.conf["spark.ui.enabled"] == "true"
    assert config.spark.conf["spark.local.dir"] == "/tmp/x"
    assert config.spark.conf["spark.driver.memory"] == "4g"
    assert config.spark.conf["spark.driver.extraJavaOptions"] == "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
    assert config.spark.conf["spark.sql.files.openCostInBytes"] == "1048576"
    assert len(config.spark.conf) == 9  # local.yaml's eight and the one added


def test_override_secret_in_spark_conf_refused() -> None:
    assert _error("spark.conf.spark.hadoop.fs.s3a.secret.key=abc").startswith(
        "spark.conf.spark.hadoop.fs.s3a.secret.key: secrets do not belong in config files")


def test_override_credentials_provider_in_spark_conf_accepted() -> None:
    key = "spark.hadoop.fs.s3a.aws.credentials.provider"
    assert _load(f"spark.conf.{key}=p.Provider").spark.conf == {key: "p.Provider"}


def test_override_string_keeps_its_text() -> None:
    assert _load("input.sales_key=010").input.sales_key == "010"


def test_spark_conf_values_become_strings() -> None:
    data = _minimal()
    data["spark"] = {"conf": {"spark.ui.enabled": False, "spark.sql.shuffle.partitions": 8}}
    assert _load(data=data).spark.conf == {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "8"}


def test_override_of_unknown_key_names_the_dotted_key() -> None:
    message = _error("input.bogus=1")
    assert message.startswith("input.bogus: unknown config key")
    assert "input.images" in message  # the known keys are listed with their prefix


def test_override_below_a_scalar_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(LOCAL, ["preprocess.size.x=1"])
    assert str(info.value) == "preprocess.size: is not a section, cannot set preprocess.size.x"


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match=r"^--set expects key=value, got 'input\.join'$"):
        parse_override("input.join")


def test_override_with_empty_key_part() -> None:
    with pytest.raises(ConfigError, match=r"^--set has an empty key in 'input\.\.join=left'$"):
        parse_override("input..join=left")


# ---------------------------------------------------------------------------------------------------------
# refusals that name the key


def test_unknown_top_level_key() -> None:
    data = _minimal()
    data["bogus"] = 1
    assert _error(data=data).startswith("bogus: unknown config key (known: input, output, preprocess")


def test_unknown_nested_key() -> None:
    data = _minimal()
    data["preprocess"] = {"sizee": 100}
    assert _error(data=data).startswith("preprocess.sizee: unknown config key")


def test_missing_required_images() -> None:
    data = _minimal()
    del data["input"]["images"]
    assert _error(data=data) == "input.images: required config key is missing"


def test_missing_required_runs_table() -> None:
    data = _minimal()
    del data["output"]["runs_table"]
    assert _error(data=data) == "output.runs_table: required config key is missing"


def test_missing_whole_section_names_first_required_key() -> None:
    data = _minimal()
    del data["output"]
    assert _error(data=data) == "output.images_table: required config key is missing"


def test_section_that_is_not_a_mapping() -> None:
    data = _minimal()
    data["preprocess"] = 3
    assert _error(data=data) == "preprocess: expected a mapping, got int"


@pytest.mark.parametrize(("override", "expected"), [
    ("preprocess.size=abc", "preprocess.size: expected an integer, got 'abc'"),
    ("preprocess.size=true", "preprocess.size: expected an integer, got True"),
    ("preprocess.size=22.5", "preprocess.size: expected an integer, got 22.5"),
    ("preprocess.crop_fraction=abc", "preprocess.crop_fraction: expected a number, got 'abc'"),
    ("input.track_deletions=maybe", "input.track_deletions: expected true or false, got 'maybe'"),
    ("input.extensions={a: 1}", "input.extensions: expected a list, got {'a': 1}"),
    ("input.sales_key=null", "input.sales_key: must not be null"),
])
def test_wrong_type(override: str, expected: str) -> None:
    assert _error(override) == expected


def test_bad_join() -> None:
    assert _error("input.join=outer") == "input.join: must be one of inner, left, got 'outer'"


def test_bad_mode() -> None:
    assert _error("preprocess.mode=stretch") == (
        "preprocess.mode: must be one of center_crop, squash, got 'stretch'")


@pytest.mark.parametrize(("override", "key"), [
    ("preprocess.size=7", "preprocess.size"),
    ("preprocess.size=4097", "preprocess.size"),
    ("preprocess.jpeg_quality=0", "preprocess.jpeg_quality"),
    ("preprocess.jpeg_quality=96", "preprocess.jpeg_quality"),
    ("preprocess.crop_fraction=0", "preprocess.crop_fraction"),
    ("preprocess.crop_fraction=-0.5", "preprocess.crop_fraction"),
    ("preprocess.crop_fraction=1.01", "preprocess.crop_fraction"),
    ("preprocess.crop_fraction=.nan", "preprocess.crop_fraction"),
    ("preprocess.max_pixels=0", "preprocess.max_pixels"),
    ("input.max_file_bytes=0", "input.max_file_bytes"),
    ("input.max_file_bytes=2000000001", "input.max_file_bytes"),
    ("spark.arrow_max_records_per_batch=0", "spark.arrow_max_records_per_batch"),
    ("s3.max_attempts=0", "s3.max_attempts"),
    ("maintenance.vacuum_retention_hours=-1", "maintenance.vacuum_retention_hours"),
])
def test_out_of_range(override: str, key: str) -> None:
    assert _error(override).startswith(key + ": must ")


@pytest.mark.parametrize("override", [
    "preprocess.size=8", "preprocess.size=4096", "preprocess.jpeg_quality=1", "preprocess.jpeg_quality=95",
    "preprocess.crop_fraction=1", "preprocess.crop_fraction=0.01", "input.max_file_bytes=2000000000",
    "maintenance.vacuum_retention_hours=0", "maintenance.optimize=false",
])
def test_range_boundaries_accepted(override: str) -> None:
    key, value = parse_override(override)
    section, name = key.split(".")
    assert getattr(getattr(_load(override), section), name) == value


def test_crop_fraction_int_becomes_float() -> None:
    value = _load("preprocess.crop_fraction=1").preprocess.crop_fraction
    assert value == 1.0
    assert isinstance(value, float)


def test_image_id_pattern_invalid_regex() -> None:
    assert _error("input.image_id_pattern=(abc").startswith(
        "input.image_id_pattern: invalid regular expression: ")


def test_image_id_pattern_without_group() -> None:
    assert _error(r"input.image_id_pattern=^.+\.jpg$") == (
        "input.image_id_pattern: needs one capturing group holding the image_id")


def test_image_id_pattern_with_group_accepted() -> None:
    assert _load(r"input.image_id_pattern=^img_(\d+)").input.image_id_pattern == r"^img_(\d+)"


@pytest.mark.parametrize("images", ["data/*.jpg", "data/img?", "s3://bucket/{a,b}", "data/[ab]"])
def test_glob_in_images(images: str) -> None:
    data = _minimal()
    data["input"]["images"] = images
    assert _error(data=data) == (
        f"input.images: must be a directory or prefix, not a glob pattern: {images!r}")


def test_bad_extension() -> None:
    assert _error("input.extensions=[jpg, 'tar.gz']") == "input.extensions[1]: not a file extension: 'tar.gz'"
    assert _error("input.extensions=[]") == "input.extensions: must list at least one extension"


@pytest.mark.parametrize("key", ["input.images", "input.sales", "output.images_table",
                                 "output.embeddings_table", "output.runs_table", "output.files_table"])
def test_unsupported_scheme(key: str) -> None:
    message = _error(f"{key}=ftp://host/x")
    assert message == f"{key}: unsupported scheme 'ftp' (use one of file, s3, s3a, dbfs, hdfs, abfss, gs, wasbs)"
    assert "pw" not in message, "a value that may hold credentials is not echoed"


@pytest.mark.parametrize("location", ["s3://bucket/x", "s3a://bucket/x", "dbfs:/mnt/x", "file:/tmp/x",
                                      "hdfs://nn:8020/x", "abfss://c@acct.dfs.core.windows.net/x",
                                      "gs://bucket/x", "relative/dir", "/abs/dir"])
def test_supported_locations(location: str) -> None:
    assert _load(f"output.runs_table={location}").output.runs_table == location


@pytest.mark.parametrize("location", ["s3://AKIA:secret@bucket/x", "s3a://AKIA:secret@bucket/x",
                                      "S3://AKIA@bucket/x"])
def test_credentials_in_s3_uri(location: str) -> None:
    message = _error(f"input.images={location}")
    assert message.startswith("input.images: credentials must not be embedded in the URI")
    assert "secret" not in message and "AKIA" not in message


def test_empty_location() -> None:
    assert _error("input.sales=") == "input.sales: must not be empty"


@pytest.mark.parametrize("key", ["spark.hadoop.fs.s3a.secret.key", "spark.hadoop.fs.s3a.access.key",
                                 "spark.hadoop.fs.s3a.session.token", "spark.some.password"])
def test_secret_in_spark_conf_refused(key: str) -> None:
    data = _minimal()
    data["spark"] = {"conf": {key: "x"}}
    assert _error(data=data).startswith(f"spark.conf.{key}: secrets do not belong in config files")


def test_credentials_provider_in_spark_conf_accepted() -> None:
    key = "spark.hadoop.fs.s3a.aws.credentials.provider"
    value = "com.amazonaws.auth.DefaultAWSCredentialsProviderChain"
    data = _minimal()
    data["spark"] = {"conf": {key: value}}
    assert _load(data=data).spark.conf == {key: value}


def test_spark_conf_key_must_start_with_spark() -> None:
    data = _minimal()
    data["spark"] = {"conf": {"sql.shuffle.partitions": "8"}}
    assert _error(data=data) == "spark.conf.sql.shuffle.partitions: Spark settings must start with 'spark.'"


@pytest.mark.parametrize("endpoint", ["minio:9000", "ftp://minio:9000", "http:// minio", "http:///x"])
def test_bad_s3_endpoint(endpoint: str) -> None:
    expected = f"s3.endpoint: expected http(s)://host[:port], got {endpoint!r}"
    assert _error(f"s3.endpoint={endpoint}") == expected


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "https://s3.eu-west-1.amazonaws.com"])
def test_good_s3_endpoint(endpoint: str) -> None:
    assert _load(f"s3.endpoint={endpoint}").s3.endpoint == endpoint


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"cannot read config file {path}: No such file or directory"


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"cannot read config file {tmp_path}: Is a directory"


def test_yaml_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- input\n- output\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config file {path} must hold a mapping at the top level"


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"config file {path} is not valid YAML: ")


def test_empty_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    config = load_config(path, ["input.images=i", "input.sales=s", "output.images_table=a",
                                "output.embeddings_table=b", "output.runs_table=c"])
    assert config.output.files_table_path == "a_files"


def test_data_merges_over_file() -> None:
    config = load_config(LOCAL, data={"preprocess": {"size": 128}})
    assert config.preprocess.size == 128
    assert config.preprocess.jpeg_quality == 90


# ---------------------------------------------------------------------------------------------------------
# qualify


def test_qualify_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert qualify("demo/images") == f"file:{tmp_path.resolve()}/demo/images"
    assert qualify("demo/images/") == f"file:{tmp_path.resolve()}/demo/images"
    assert qualify("file:demo") == f"file:{tmp_path.resolve()}/demo"


def test_qualify_file_uri_forms(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    assert qualify(f"file://{root}/") == f"file:{root}"
    assert qualify(f"file:{root}/a") == f"file:{root}/a"
    assert qualify(f"{root}/a/") == f"file:{root}/a"
    assert qualify("file:///x/") == "file:/x"


def test_qualify_keeps_remote_uris() -> None:
    assert qualify("s3a://bucket/prefix/") == "s3a://bucket/prefix"
    assert qualify("s3a://bucket/prefix") == "s3a://bucket/prefix"
    assert qualify("s3://bucket/a/b//") == "s3://bucket/a/b"
    assert qualify("dbfs:/mnt/x/") == "dbfs:/mnt/x"


# ---------------------------------------------------------------------------------------------------------
# preprocess_id


def test_preprocess_id_values() -> None:
    assert PreprocessConfig().preprocess_id == "center_crop-224-cf0.875-q90"
    assert PreprocessConfig(mode="squash").preprocess_id == "squash-224-q90"


@pytest.mark.parametrize("changed", [
    PreprocessConfig(size=256), PreprocessConfig(mode="squash"), PreprocessConfig(jpeg_quality=85),
    PreprocessConfig(crop_fraction=1.0),
])
def test_preprocess_id_changes_with_pixel_settings(changed: PreprocessConfig) -> None:
    assert changed.preprocess_id != PreprocessConfig().preprocess_id


def test_preprocess_id_squash_ignores_crop_fraction() -> None:
    assert (PreprocessConfig(mode="squash", crop_fraction=0.5).preprocess_id
            == PreprocessConfig(mode="squash", crop_fraction=1.0).preprocess_id == "squash-224-q90")


def test_preprocess_id_ignores_max_pixels() -> None:
    assert PreprocessConfig(max_pixels=10).preprocess_id == PreprocessConfig().preprocess_id


# ---------------------------------------------------------------------------------------------------------
# the command line


def test_cli_check_config_unknown_key(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    caplog.set_level(logging.ERROR, logger="image_embeddings")
    assert main(["check-config", "--config", str(LOCAL), "--set", "input.bogus=1"]) == 2
    errors = [r for r in caplog.records if r.name == "image_embeddings" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage().startswith("invalid configuration: input.bogus: unknown config key")
    assert capsys.readouterr().out == ""


def test_cli_check_config_of_a_one_day_config_needs_no_run_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(CONF / "emr.yaml")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["input"]["images"] == "s3://my-bucket/raw-images/{run_date}"
    assert printed["maintenance"] == {"vacuum_retention_hours": 168, "optimize": True}
    assert main(["check-config", "--config", str(CONF / "emr.yaml"), "--run-date", "2026-11-23"]) == 0
    assert json.loads(capsys.readouterr().out)["input"]["images"] == "s3://my-bucket/raw-images/2026-11-23"


def test_cli_check_config_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(LOCAL), "--set", "input.join=left"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["input"]["join"] == "left"
    assert printed["input"]["extensions"] == ["jpg", "jpeg", "png", "webp"]
    assert printed["preprocess"]["size"] == 224
    assert printed["output"]["files_table"] is None
    assert printed["spark"]["conf"]["spark.sql.shuffle.partitions"] == "4"


def test_cli_check_config_keeps_provider_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = "spark.hadoop.fs.s3a.aws.credentials.provider"
    raw = yaml.safe_load(LOCAL.read_text())
    raw["spark"]["conf"][key] = "p.Provider"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check-config", "--config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["spark"]["conf"][key] == "p.Provider"


# ---------------------------------------------------------------------------------------------------------
# report.redact


def test_redact_secret_keys_nested() -> None:
    data = {
        "secret_key": "s", "aws_access_key_id": "AKIA", "password": "pw", "token": "t",
        "nested": {"fs.s3a.secret.key": "s2", "session_token": "t2", "name": "keep",
                   "items": [{"PASSWORD": "pw2", "size": 3}, "plain", 7]},
        "spark.hadoop.fs.s3a.aws.credentials.provider": "p.Provider",
        "aws.credentials.provider": "q.Provider",
        "endpoint": "http://127.0.0.1:9000", "count": 4, "flags": [True, None],
    }
    assert redact(data) == {
        "secret_key": "***", "aws_access_key_id": "***", "password": "***", "token": "***",
        "nested": {"fs.s3a.secret.key": "***", "session_token": "***", "name": "keep",
                   "items": [{"PASSWORD": "***", "size": 3}, "plain", 7]},
        "spark.hadoop.fs.s3a.aws.credentials.provider": "p.Provider",
        "aws.credentials.provider": "q.Provider",
        "endpoint": "http://127.0.0.1:9000", "count": 4, "flags": [True, None],
    }


def test_redact_secret_holding_a_mapping_is_replaced_whole() -> None:
    assert redact({"credentials": {"user": "u", "pass": "p"}}) == {"credentials": "***"}


def test_redact_keeps_none_and_does_not_mutate() -> None:
    data = {"password": None, "token": "t"}
    assert redact(data) == {"password": None, "token": "***"}
    assert data == {"password": None, "token": "t"}


def test_redact_scalars_and_non_string_keys() -> None:
    assert redact("secret") == "secret"
    assert redact([{"token": 1}]) == [{"token": "***"}]
    assert redact({1: "x"}) == {1: "x"}


def _schema_keys(cls: type = AppConfig, prefix: str = "") -> list[str]:
    import dataclasses
    import typing

    keys: list[str] = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _schema_keys(tp, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            keys.append(prefix + name)
    return keys


def test_readme_documents_every_config_key() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", readme, flags=re.MULTILINE))
    assert documented == set(_schema_keys())


def test_endpoint_with_credentials_and_empty_section() -> None:
    message = _error("s3.endpoint=http://user:pw@127.0.0.1:9000")
    assert message.startswith("s3.endpoint: credentials must not be embedded") and "pw" not in message
    data = _minimal()
    data["preprocess"] = None
    assert _load(data=data).preprocess.size == 224


@pytest.mark.parametrize(("overrides", "with_s3"), [
    ((), False),
    (("input.images=s3a://bucket/images",), True),
    (("output.runs_table=s3://bucket/runs",), True),
    (("s3.endpoint=http://127.0.0.1:9000",), True),
])
def test_s3_packages_only_when_the_config_reaches_s3(overrides: tuple[str, ...], with_s3: bool) -> None:
    from image_embeddings.spark import session_settings

    packages = session_settings(load_config(LOCAL, list(overrides)))["spark.jars.packages"].split(",")
    assert packages[0] == "io.delta:delta-spark_2.13:4.0.1"
    assert ("org.apache.hadoop:hadoop-aws:3.4.1" in packages) is with_s3
