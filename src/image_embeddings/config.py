"""Typed configuration: YAML files plus ``--set key=value`` overrides, validated once at start-up."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from image_embeddings.images import DEFAULT_EXTENSIONS, MODES
from image_embeddings.redaction import is_secret_key, scrub
from image_embeddings.tables import TableRef, table_kind
from image_embeddings.uri import has_user_info, location_problem, normalize


class ConfigError(ValueError):
    """A configuration value is missing, unknown or malformed; the message names the key."""


_GLOB_CHARS = set("*?[]{}")


@dataclass(frozen=True)
class InputConfig:
    """Where the images and the sales table come from and how files are selected."""

    images: str
    sales: str
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    image_id_pattern: str = r"^(.+)\.[^.]+$"
    max_file_bytes: int = 64 * 1024 * 1024
    sales_key: str = "image_id"
    join: Literal["inner", "left"] = "inner"
    track_deletions: bool = True


@dataclass(frozen=True)
class OutputConfig:
    """The Delta tables: each a storage path or a metastore name (:func:`tables.table_kind`)."""

    images_table: str
    embeddings_table: str
    runs_table: str
    files_table: str | None = None
    # External locations of tables by name (``db.images: s3://bucket/images``); a name without one is managed.
    locations: dict[str, str] = field(default_factory=dict)

    @property
    def files_table_path(self) -> str:
        """The per-file state table; defaults to ``<images_table>_files``."""
        return self.files_table or self.images_table.rstrip("/") + "_files"

    def table(self, value: str) -> TableRef:
        """``value`` (a path or a name) as a table, with a name's external location from ``locations``."""
        found = {k.lower(): v for k, v in self.locations.items()}.get(value.lower())
        return TableRef.of(value, found if table_kind(value) == "name" else None)

    @property
    def images(self) -> TableRef:
        """``images_table`` as a table."""
        return self.table(self.images_table)

    @property
    def embeddings(self) -> TableRef:
        """``embeddings_table`` as a table."""
        return self.table(self.embeddings_table)

    @property
    def runs(self) -> TableRef:
        """``runs_table`` as a table."""
        return self.table(self.runs_table)

    @property
    def files(self) -> TableRef:
        """The files table (:attr:`files_table_path`) as a table."""
        return self.table(self.files_table_path)


@dataclass(frozen=True)
class PreprocessConfig:
    """How stage 1 decodes and downscales an image."""

    size: int = 224
    mode: Literal["center_crop", "squash"] = "center_crop"
    crop_fraction: float = 0.875
    jpeg_quality: int = 90
    max_pixels: int = 100_000_000

    @property
    def preprocess_id(self) -> str:
        """A short stable identity of the pixels this configuration produces."""
        crop = f"-cf{self.crop_fraction!r}" if self.mode == "center_crop" else ""
        return f"{self.mode}-{self.size}{crop}-q{self.jpeg_quality}"


@dataclass(frozen=True)
class SparkConfig:
    """Settings used when this package creates the SparkSession itself."""

    app_name: str = "image-embeddings"
    master: str | None = None
    packages: tuple[str, ...] = ()
    # Resolved only when the config reaches S3 (an s3:// or s3a:// location, or s3.endpoint; see
    # spark.reaches_s3): hadoop-aws and its 560 MB AWS SDK bundle would otherwise be searched by every class lookup.
    s3_packages: tuple[str, ...] = ()
    ivy_dir: str | None = None
    # Local sessions only: a folder for the driver JVM's class-data-sharing archive (made by the first run, used by
    # later ones: about 4 s less per run on 2 cores). Empty: none.
    class_archive_dir: str | None = None
    arrow_max_records_per_batch: int = 32
    arrow_max_bytes_per_batch: int = 64 * 1024 * 1024
    conf: dict[str, str] = field(default_factory=dict)
    embed_conf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class S3Config:
    """S3A client settings; credentials always come from the default provider chain."""

    endpoint: str | None = None
    region: str | None = None
    path_style_access: bool = False
    ssl: bool = True
    map_s3_scheme: bool = False
    max_attempts: int = 5
    retry_limit: int = 7


@dataclass(frozen=True)
class ModelConfig:
    """Stage 2: which backbone and weights embed the images, where and how."""

    name: str = "resnet50"
    weights: str = "imagenet"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = 64
    normalize: bool = True
    cache_dir: str = "~/.cache/image-embeddings"
    threads: int | None = None
    arrow_batch_rows: int = 256
    partitions: int | None = None
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    engine: Literal["auto", "eager", "onednn"] = "auto"


@dataclass(frozen=True)
class MaintenanceConfig:
    """``image-embeddings maintain``: OPTIMIZE and VACUUM of the package's Delta tables."""

    vacuum_retention_hours: int = 168
    optimize: bool = True


INDEX_TYPES = ("auto", "flat", "ivf_flat", "ivf_sq8", "ivf_pq")


@dataclass(frozen=True)
class IndexConfig:
    """``image-embeddings index`` and ``neighbours``: the nearest-neighbour index and the neighbours table."""

    location: str | None = None          # default <embeddings_table>_index
    type: Literal["auto", "flat", "ivf_flat", "ivf_sq8", "ivf_pq"] = "auto"
    exact_below: int = 50_000            # auto: an exact (flat) index below this many rows
    pq_above: int = 5_000_000            # auto: IVF-SQ8 up to this many rows, IVF-PQ above
    nprobe: int = 32                     # inverted lists searched per query
    train_rows: int = 50_000             # at most this many sampled rows train the coarse quantizer
    rebuild_fraction: float = 0.2        # rebuild when rows changed since the last build pass this fraction
    neighbours_table: str | None = None  # default <embeddings_table>_neighbours
    neighbours_k: int = 20

    def location_for(self, embeddings: TableRef) -> str:
        """Where the index lives: ``location`` or ``<embeddings_table>_index`` (a named table: beside its
        external location; a managed one has none to derive from, so ``location`` must be set)."""
        return self.location or _beside(embeddings, "_index", "index.location", "a folder")

    def neighbours_for(self, embeddings_table: str) -> str:
        """The neighbours table: ``neighbours_table`` or ``<embeddings_table>_neighbours``."""
        return self.neighbours_table or embeddings_table.rstrip("/") + "_neighbours"


@dataclass(frozen=True)
class LeaseConfig:
    """One writer at a time per set of tables (see :mod:`image_embeddings.lease`)."""

    location: str | None = None   # default <images_table>_lease.json
    wait_seconds: int = 600       # how long a run waits for another run's lease before it fails
    ttl_seconds: int = 300        # a lease whose holder stopped renewing it expires this long after its last renewal

    def location_for(self, images: TableRef) -> str:
        """Where the lease lives: ``location`` or ``<images_table>_lease.json`` (a named table: beside its
        external location; a managed one has none to derive from, so ``location`` must be set)."""
        return self.location or _beside(images, "_lease.json", "lease.location", "a file")


def _beside(table: TableRef, suffix: str, key: str, what: str) -> str:
    """A location named after ``table``'s storage; a :class:`ConfigError` naming ``key`` for a managed table."""
    if table.storage is None:
        raise ConfigError(
            f"{key}: {table} is a managed metastore table, whose files the catalog places (and Unity Catalog does "
            f"not let a job write beside): set {key} to {what} on storage, such as "
            f"/Volumes/<catalog>/<schema>/<volume>/{suffix.lstrip('_')} or s3://bucket/path/{suffix.lstrip('_')}, "
            "or give the table an external location in output.locations")
    return table.storage.rstrip("/") + suffix


@dataclass(frozen=True)
class AppConfig:
    """The whole validated configuration."""

    input: InputConfig
    output: OutputConfig
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    s3: S3Config = field(default_factory=S3Config)
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)


# ---------------------------------------------------------------------------------------------------------
# loading


def load_config(path: str | os.PathLike[str] | None = None, overrides: typing.Sequence[str] = (),
                data: dict[str, Any] | None = None, run_date: str | None = None,
                needs_input: bool = True) -> AppConfig:
    """Load a YAML file (or a dict), apply ``key=value`` overrides and return a validated config.

    ``{run_date}`` in ``input.images`` or ``input.sales`` is replaced by ``run_date`` (YYYY-MM-DD), so one
    config serves every nightly run and every re-run of a single day. ``needs_input=False`` (commands that
    read no input: ``maintain``, ``check-config``) leaves the placeholder in place when no date is given.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        import yaml

        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        raw = loaded
    if data is not None:
        raw = _deep_merge(raw, data)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, _Override(item.split("=", 1)[1], value))
    config = normalized(_build(AppConfig, raw, ""))
    if needs_input or run_date is not None:
        config = with_run_date(config, run_date)
    _check(config)
    return config


def normalized(config: AppConfig) -> AppConfig:
    """``config`` with every location in one spelling (:func:`uri.normalize`): ``s3a://b//raw/day/`` and
    ``s3a://b/raw/day`` are one folder to plan against, store and scope by."""
    def clean(section: Any, *names: str) -> Any:
        values = {n: normalize(getattr(section, n)) for n in names if getattr(section, n)}
        return dataclasses.replace(section, **values)

    def tables(section: Any, *names: str) -> Any:
        values = {n: _clean_table(getattr(section, n)) for n in names if getattr(section, n)}
        return dataclasses.replace(section, **values)

    output = tables(config.output, "images_table", "embeddings_table", "runs_table", "files_table")
    return dataclasses.replace(
        config, input=clean(config.input, "images", "sales"),
        output=dataclasses.replace(output, locations={k.strip(): normalize(v) for k, v in output.locations.items()}),
        index=tables(clean(config.index, "location"), "neighbours_table"), lease=clean(config.lease, "location"))


def _clean_table(value: str) -> str:
    """A table path normalized (still a path: ``./a.b`` keeps its ``./``), a name as written."""
    try:
        if table_kind(value) == "name":
            return value.strip()
    except ValueError:
        return value  # refused, naming the key, by the checks
    clean = normalize(value)
    try:
        return clean if table_kind(clean) == "path" else "./" + clean
    except ValueError:
        return "./" + clean


def with_run_date(config: AppConfig, run_date: str | None) -> AppConfig:
    """Fill ``{run_date}`` in the input locations; a placeholder without a date is an error naming the key."""
    import datetime as dt

    if run_date is not None:
        try:
            dt.date.fromisoformat(run_date)
        except ValueError:
            raise ConfigError(f"run_date: expected YYYY-MM-DD, got {run_date!r}") from None
    values = {}
    for key in ("images", "sales"):
        value = getattr(config.input, key)
        if "{run_date}" in value:
            if run_date is None:
                raise ConfigError(f"input.{key}: contains {{run_date}}; pass --run-date YYYY-MM-DD")
            values[key] = value.replace("{run_date}", run_date)
    return dataclasses.replace(config, input=dataclasses.replace(config.input, **values)) if values else config


@dataclass(frozen=True)
class _Override:
    """A ``--set`` value: its text, for string fields, and its YAML reading, for the others."""

    text: str
    value: Any


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``a.b=value`` into the dotted key and its YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    import yaml

    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _map_prefixes(cls: type = AppConfig, prefix: str = "") -> list[str]:
    """Dotted names of free-form mapping fields (``spark.conf``), whose own keys contain dots."""
    found: list[str] = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            found += _map_prefixes(tp, f"{prefix}{name}.")  # type: ignore[arg-type]
        elif typing.get_origin(tp) is dict:
            found.append(prefix + name)
    return found


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for mapping in _map_prefixes():
        if key.startswith(mapping + ".") and len(key) > len(mapping) + 1:
            parts = [*mapping.split("."), key[len(mapping) + 1:]]
            break
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<top>'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        names = ", ".join(prefix + str(u) for u in unknown)
        raise ConfigError(f"{names}: unknown config key (known: {', '.join(prefix + f for f in fields)})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if no_default:
                if dataclasses.is_dataclass(hints[name]):
                    kwargs[name] = _build(hints[name], {}, key + ".")
                    continue
                raise ConfigError(f"{key}: required config key is missing")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _Override):
        wants_text = tp is str or (origin in (Union, types.UnionType) and str in args)
        value = value.text if wants_text and value.value is not None else value.value
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key + ".")  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        out = {}
        for k, v in value.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            out[str(k)] = _coerce(args[1], v, f"{key}.{k}")
        return out
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - schema error


# ---------------------------------------------------------------------------------------------------------
# semantic checks


def _check(config: AppConfig) -> None:
    inp, pre, spark, s3 = config.input, config.preprocess, config.spark, config.s3
    for key, value in (("input.images", inp.images), ("input.sales", inp.sales)):
        _check_location(key, value)
    _check_tables(config)
    if _GLOB_CHARS & set(inp.images.replace("{run_date}", "")):
        raise ConfigError(f"input.images: must be a directory or prefix, not a glob pattern: {inp.images!r}")
    if not inp.extensions:
        raise ConfigError("input.extensions: must list at least one extension")
    for i, ext in enumerate(inp.extensions):
        if not re.fullmatch(r"[A-Za-z0-9]+", ext.lstrip(".")):
            raise ConfigError(f"input.extensions[{i}]: not a file extension: {ext!r}")
    try:
        pattern = re.compile(inp.image_id_pattern)
    except re.error as exc:
        raise ConfigError(f"input.image_id_pattern: invalid regular expression: {exc}") from exc
    if "(?P" in inp.image_id_pattern:
        raise ConfigError("input.image_id_pattern: Spark uses Java regular expressions; write a named group as "
                          "(?<name>...), not (?P<name>...)")
    if pattern.groups < 1:
        raise ConfigError("input.image_id_pattern: needs one capturing group holding the image_id")
    if inp.max_file_bytes < 1 or inp.max_file_bytes > 2_000_000_000:
        raise ConfigError("input.max_file_bytes: must be between 1 and 2000000000 (Spark reads at most 2 GB)")
    if not inp.sales_key:
        raise ConfigError("input.sales_key: must not be empty")
    if pre.mode not in MODES:
        raise ConfigError(f"preprocess.mode: must be one of {', '.join(MODES)}")
    if not 8 <= pre.size <= 4096:
        raise ConfigError(f"preprocess.size: must be between 8 and 4096, got {pre.size}")
    if not 0.0 < pre.crop_fraction <= 1.0:
        raise ConfigError(f"preprocess.crop_fraction: must be in (0, 1], got {pre.crop_fraction}")
    if not 1 <= pre.jpeg_quality <= 95:
        raise ConfigError(f"preprocess.jpeg_quality: must be between 1 and 95, got {pre.jpeg_quality}")
    if pre.max_pixels < 1:
        raise ConfigError("preprocess.max_pixels: must be positive")
    _check_model(config.model)
    if spark.arrow_max_records_per_batch < 1:
        raise ConfigError("spark.arrow_max_records_per_batch: must be positive")
    if not 1 <= spark.arrow_max_bytes_per_batch < 2**31 - 1:
        raise ConfigError("spark.arrow_max_bytes_per_batch: must be between 1 and 2147483646")
    for section, settings in (("spark.conf", spark.conf), ("spark.embed_conf", spark.embed_conf)):
        for key in settings:
            if not key.startswith("spark."):
                raise ConfigError(f"{section}.{key}: Spark settings must start with 'spark.'")
            if is_secret_key(key):
                raise ConfigError(f"{section}.{key}: secrets do not belong in config files; "
                                  "credentials come from the AWS default provider chain")
            if has_user_info(settings[key]):
                raise ConfigError(f"{section}.{key}: the value carries credentials in a URL (user info before "
                                  "'@'); remove them (for a Maven repository, use spark.jars.ivySettings with a "
                                  "credentials file)")
    if s3.max_attempts < 1 or s3.retry_limit < 0:
        raise ConfigError("s3.max_attempts: must be >= 1 and s3.retry_limit >= 0")
    if s3.endpoint is not None and has_user_info(s3.endpoint):
        raise ConfigError("s3.endpoint: credentials must not be embedded in the URL (user info before '@'); "
                          "they come from the AWS default provider chain")
    if s3.endpoint is not None and not re.match(r"^https?://[^\s/@]+(/|$)", s3.endpoint):
        raise ConfigError(f"s3.endpoint: expected http(s)://host[:port], got {scrub(s3.endpoint)!r}")
    if config.maintenance.vacuum_retention_hours < 0:
        raise ConfigError("maintenance.vacuum_retention_hours: must be >= 0, got "
                          f"{config.maintenance.vacuum_retention_hours}")
    _check_index(config.index)
    _check_lease(config.lease)


def _check_tables(config: AppConfig) -> None:
    """Each table a path or a name (never a guess), and ``output.locations`` only for this config's names."""
    out = config.output
    named: list[str] = []
    for key, value in (("output.images_table", out.images_table), ("output.embeddings_table", out.embeddings_table),
                       ("output.runs_table", out.runs_table), ("output.files_table", out.files_table),
                       ("index.neighbours_table", config.index.neighbours_table)):
        if value is None:
            continue
        try:
            kind = table_kind(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if kind == "path":
            _check_location(key, value)
    for value in (out.images_table, out.embeddings_table, out.runs_table, out.files_table_path,
                  config.index.neighbours_for(out.embeddings_table)):
        if table_kind(value) == "name":
            named.append(value.lower())
    for name, location in out.locations.items():
        key = f"output.locations.{name}"
        if name.lower() not in named:
            raise ConfigError(f"{key}: not a table this config names (tables by name here: "
                              f"{', '.join(sorted(set(named))) or 'none'}); a location applies to a table by name")
        _check_location(key, location)
        try:
            is_path = table_kind(location) == "path"
        except ValueError:
            is_path = False
        if not is_path:
            raise ConfigError(f"{key}: expected a storage location (s3://bucket/path, /Volumes/..., ./folder), "
                              f"got {location!r}")


def _check_lease(lease: LeaseConfig) -> None:
    if lease.location is not None:
        _check_location("lease.location", lease.location)
    if lease.wait_seconds < 0:
        raise ConfigError(f"lease.wait_seconds: must be >= 0, got {lease.wait_seconds}")
    if lease.ttl_seconds < 10:
        raise ConfigError(f"lease.ttl_seconds: must be at least 10 (renewed every fifth of it), "
                          f"got {lease.ttl_seconds}")


def _check_index(index: IndexConfig) -> None:
    if index.location is not None:
        _check_location("index.location", index.location)
    if index.type not in INDEX_TYPES:
        raise ConfigError(f"index.type: must be one of {', '.join(INDEX_TYPES)}, got {index.type!r}")
    for key, number in (("index.exact_below", index.exact_below), ("index.pq_above", index.pq_above),
                        ("index.nprobe", index.nprobe), ("index.train_rows", index.train_rows),
                        ("index.neighbours_k", index.neighbours_k)):
        if number < 1:
            raise ConfigError(f"{key}: must be positive, got {number}")
    if not 0.0 < index.rebuild_fraction <= 10.0:
        raise ConfigError(f"index.rebuild_fraction: must be in (0, 10], got {index.rebuild_fraction}")


def _check_model(model: ModelConfig) -> None:
    from image_embeddings.models import MODELS
    from image_embeddings.weights import is_weights_spec

    if has_user_info(model.weights):
        raise ConfigError("model.weights: credentials must not be embedded in the URI (user info before '@'); "
                          "S3 credentials come from the AWS default provider chain")
    if model.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {model.name!r} (registered: {', '.join(sorted(MODELS))})")
    if not is_weights_spec(model.weights):
        raise ConfigError(f"model.weights: expected imagenet, random:SEED, a file path or an s3:// URI, "
                          f"got {scrub(model.weights)!r}")
    if model.batch_size < 1 or model.arrow_batch_rows < 1:
        raise ConfigError("model.batch_size: and model.arrow_batch_rows must be positive")
    if model.threads is not None and model.threads < 1:
        raise ConfigError("model.threads: must be positive")
    if model.partitions is not None and model.partitions < 1:
        raise ConfigError("model.partitions: must be positive")


def _check_location(key: str, value: str) -> None:
    problem = location_problem(value)
    if problem is not None:
        raise ConfigError(f"{key}: {problem}")


def as_dict(config: AppConfig) -> dict[str, Any]:
    """Return the config as plain data (for reports and logs)."""
    return dataclasses.asdict(config)
