"""The pipeline configuration: one YAML file loaded into frozen, self-validating dataclasses.

Every key is checked before a pipeline is built: unknown keys (with the nearest valid key
suggested), wrong types, malformed durations, bad choices and missing files each produce one line
``<file>: <path.in.file>: <reason>`` in a :class:`ConfigError`; the CLI prints them and exits 2.
``PipelineOptions`` carry runner flags only; everything about *what* the job does lives here.

The reference config (``schemas/configs/reference.yaml``) documents every key and its default.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from transforms.duration import Duration
from transforms.io.kafka import KafkaDeliveryConfig, KafkaSourceConfig
from transforms.io.pubsub import PubSubDeliveryConfig, PubSubSourceConfig
from transforms.io.webhook import WebhookConfig
from transforms.pii import PiiRule


class ConfigError(ValueError):
    """One or more configuration problems, each ``file: path: reason``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --- durations ---------------------------------------------------------------------------------

# Duration lives in transforms/duration.py (adapter configs declare durations too).


def parse_instant(text: str) -> float:
    """An ISO 8601 instant as epoch seconds (naive instants are UTC)."""
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


# --- the configuration model -------------------------------------------------------------------


@dataclass(frozen=True)
class SourceConfig:
    name: str
    # files: NDJSON or Avro, local or any Beam filesystem; kafka: topics, continuous in a
    # streaming run (transforms/io/kafka.py; the `kafka` section); pubsub: Dataflow streaming.
    type: Literal["files", "kafka", "pubsub"] = "files"
    format: Literal["ndjson", "avro"] = "ndjson"
    # Globs, relative to the config file; `cdi run --input` replaces them.
    paths: tuple[str, ...] = ()
    # The name of a plan in `tracking_plans`; none: the envelope rules only (type, messageId,
    # identity, timestamps, size, depth), every well-formed event accepted, plan_version "none".
    tracking_plan: str | None = None
    # Per tracking-plan rule: block (quarantine), omit (strip the offending value, keep the event,
    # note it in context.cdi), allow (keep and note). `default` applies to unnamed rules.
    violations: dict[str, Literal["block", "omit", "allow"]] = field(default_factory=dict)
    # For type: kafka (see transforms/io/kafka.py and the reference config).
    kafka: KafkaSourceConfig | None = None
    # For type: pubsub (Dataflow streaming; transforms/io/pubsub.py).
    pubsub: PubSubSourceConfig | None = None

    @property
    def continuous(self) -> bool:
        """Read without end in a streaming run: a subscription, or a topic with no `stop`."""
        return self.type == "pubsub" or (self.type == "kafka" and self.kafka.stop is None)

    @property
    def resumes(self) -> bool:
        """Read continuously from where an earlier run left off (not from `earliest`)."""
        return self.continuous and not (self.type == "kafka" and self.kafka.start == "earliest")

    def __post_init__(self):
        from transforms.tracking_plan import CONFIGURABLE_RULES

        if self.type == "kafka" and self.kafka is None:
            raise ValueError("kafka: a source of type kafka needs its `kafka` section")
        if self.type != "kafka" and self.kafka is not None:
            raise ValueError(f"kafka: only for sources of type kafka, not {self.type}")
        if (self.type == "pubsub") != (self.pubsub is not None):
            raise ValueError("pubsub: a source of type pubsub needs its `pubsub` section (only it)")

        for rule in self.violations:
            if rule != "default" and rule not in CONFIGURABLE_RULES:
                hint = difflib.get_close_matches(rule, CONFIGURABLE_RULES, n=1)
                extra = (
                    f"; did you mean {hint[0]!r}?"
                    if hint
                    else f"; rules: default, {', '.join(CONFIGURABLE_RULES)}"
                )
                raise ValueError(f"violations: unknown rule {rule!r}{extra}")


@dataclass(frozen=True)
class TrackingPlanRef:
    # Path to the plan YAML, relative to the config file.
    path: str


@dataclass(frozen=True)
class ValidationConfig:
    # Serialized events larger than this are quarantined as decode.oversize before parsing.
    max_event_bytes: int = 32768
    # Deeper JSON nesting than this is quarantined as schema.too_deep.
    max_depth: int = 16

    def __post_init__(self):
        if self.max_event_bytes <= 0:
            raise ValueError("max_event_bytes must be positive")
        if self.max_depth <= 0:
            raise ValueError("max_depth must be positive")


@dataclass(frozen=True)
class EventTimeConfig:
    # Corrected event times further in the future than this (vs receivedAt) are invalid.
    max_future_skew: Duration = Duration(3600)
    # Event times before this instant are invalid.
    min_event_time: str = "2015-01-01T00:00:00Z"
    # quarantine: reason timestamp.out_of_range; clamp: use receivedAt instead.
    on_invalid: Literal["quarantine", "clamp"] = "quarantine"

    def __post_init__(self):
        try:
            parse_instant(self.min_event_time)
        except ValueError:
            raise ValueError(
                f"min_event_time {self.min_event_time!r} is not an ISO 8601 instant"
            ) from None


@dataclass(frozen=True)
class DedupConfig:
    # Fields (JSON paths into the event) whose values form the idempotency key.
    key: tuple[str, ...] = ("source", "messageId")
    # Event-time TTL of a seen key: a replay inside it is suppressed; state is cleared after it.
    ttl: Duration = Duration(7 * 86400)

    def __post_init__(self):
        if not self.key:
            raise ValueError("key must name at least one field")
        if self.ttl <= 0:
            raise ValueError("ttl must be positive")


@dataclass(frozen=True)
class WindowsConfig:
    # How far behind the watermark an event may arrive and still update windowed results;
    # later events go to the `late` output. Longer = more complete, more state held longer.
    allowed_lateness: Duration = Duration(2 * 86400)

    def __post_init__(self):
        if self.allowed_lateness < 0:
            raise ValueError("allowed_lateness must not be negative")


@dataclass(frozen=True)
class WindowConfig:
    type: Literal["fixed", "sliding", "session", "lifetime"] = "lifetime"
    size: Duration | None = None  # fixed, sliding
    period: Duration | None = None  # sliding: how often a new window starts
    gap: Duration | None = None  # session: inactivity that closes a session

    def __post_init__(self):
        need = {
            "fixed": ("size",),
            "sliding": ("size", "period"),
            "session": ("gap",),
            "lifetime": (),
        }
        for name in need[self.type]:
            value = getattr(self, name)
            if value is None or value <= 0:
                raise ValueError(f"a {self.type} window needs a positive '{name}'")
        if self.type == "sliding" and self.period > self.size:
            raise ValueError("a sliding window's period must not exceed its size")


@dataclass(frozen=True)
class PaneTriggerConfig:
    # Early (speculative) panes this long in processing time after new data; none by default.
    early: Duration | None = None
    # A pane at the watermark (window end) is always emitted. `late`: a corrected pane for each
    # event that arrives after it but within windows.allowed_lateness.
    late: bool = True
    # accumulating: each pane is the window's full value (replaces the earlier pane);
    # discarding: each pane is the delta since the last one (count and sum only).
    accumulation: Literal["accumulating", "discarding"] = "accumulating"


@dataclass(frozen=True)
class ComputedTraitConfig:
    name: str
    aggregate: Literal["count", "sum", "distinct_count", "first_seen", "last_seen"]
    # Track event name to aggregate; omitted = every event (any type).
    event: str | None = None
    # JSON path into the event (e.g. properties.revenue) for sum and distinct_count.
    property: str | None = None
    window: WindowConfig = WindowConfig()
    trigger: PaneTriggerConfig = PaneTriggerConfig()

    def __post_init__(self):
        if self.aggregate in ("sum", "distinct_count") and not self.property:
            raise ValueError(f"aggregate '{self.aggregate}' needs a 'property'")
        if self.trigger.accumulation == "discarding" and self.aggregate not in ("count", "sum"):
            raise ValueError(
                "discarding panes are additive deltas: only count and sum support them"
            )
        if self.trigger.accumulation == "discarding" and self.window.type == "session":
            # Merging two sessions makes a new window whose first pane would have to carry both
            # sessions' deltas already emitted: the profile would keep only the new pane's.
            raise ValueError(
                "discarding panes cannot follow session windows (sessions merge); use accumulating"
            )


@dataclass(frozen=True)
class ProfileConfig:
    # Traits where the earliest event time wins (every other trait: latest event time wins).
    set_once: tuple[str, ...] = ()
    # Numeric traits that are added up instead of replaced.
    increment: tuple[str, ...] = ()
    # Streaming: emit updated profiles this often (processing time). Batch: once, at the end.
    update_every: Duration | None = None

    def __post_init__(self):
        if self.update_every is not None and self.update_every <= 0:
            raise ValueError("update_every: must be positive (or null: on every change)")


@dataclass(frozen=True)
class IdentifierType:
    name: str
    # JSON paths into the event where this identifier is read.
    paths: tuple[str, ...]
    normalizer: Literal["none", "trim", "lowercase", "email", "phone"] = "trim"
    # At most this many identifiers of this type in one person (0 = unlimited).
    limit: int = 0


@dataclass(frozen=True)
class IdentityConfig:
    types: tuple[IdentifierType, ...] = (
        IdentifierType("user_id", ("userId",), "trim", 1),
        IdentifierType("email", ("traits.email", "context.traits.email"), "email", 0),
        IdentifierType("anonymous_id", ("anonymousId", "previousId"), "trim", 0),
        IdentifierType("device_id", ("context.device.id",), "trim", 0),
    )
    blocklist: tuple[str, ...] = ("", "undefined", "null", "none", "anonymous", "guest", "0", "nan")
    blocklist_patterns: tuple[str, ...] = (r"^(\d)\1{3,}$", r"^[0-]+$")
    # A person may not exceed this many identifiers; a link that would is refused.
    max_cluster_size: int = 50
    # Connected-component rounds of identity stitching (Hash-to-Min, transforms/components.py):
    # identifier chains up to about 2 ** (rounds - 4) long are found exactly (measured: 16 rounds
    # take a chain of 5,000 identifiers, 12 one of 512);
    # a longer one is counted as unresolved links in the run report.
    rounds: int = 16

    def __post_init__(self):
        if self.max_cluster_size < 2:
            raise ValueError("max_cluster_size: must be at least 2")
        if not 2 <= self.rounds <= 30:
            raise ValueError("rounds: must be between 2 and 30")
        for p in self.blocklist_patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"blocklist_patterns: {p!r} is not a valid regex: {e}") from None


# Keys an earlier version had, with what to write instead (a config error names them).
REPLACED_KEYS = {
    (IdentityConfig, "max_hops"): (
        "replaced by `rounds` (default 16): stitching now finds whole identifier graphs up to "
        "chains of ~2 ** (rounds - 4) identifiers, where max_hops stopped at max_hops links; delete it"
    ),
}

PiiAction = Literal["keep", "hash", "drop"]


@dataclass(frozen=True)
class DeliveryConfig:
    """How a destination's records leave the job (adapters in transforms/io/)."""

    type: Literal["files", "kafka", "webhook", "pubsub"] = "files"
    kafka: KafkaDeliveryConfig | None = None
    webhook: WebhookConfig | None = None
    pubsub: PubSubDeliveryConfig | None = None

    def __post_init__(self):
        for kind in ("kafka", "webhook", "pubsub"):
            given = getattr(self, kind) is not None
            if kind == self.type and not given:
                raise ValueError(f"{kind}: a delivery of type {kind} needs its `{kind}` section")
            if kind != self.type and given:
                raise ValueError(f"{kind}: only for deliveries of type {kind}, not {self.type}")


@dataclass(frozen=True)
class DestinationConfig:
    # Consent purposes the person must have granted for an event to reach this destination.
    purposes: tuple[str, ...] = ()
    # PII class -> keep | hash | drop, for this destination.
    pii: dict[str, PiiAction] = field(default_factory=dict)
    # What happens to a PII class the `pii` map does not name: safe by default.
    pii_default: PiiAction = "drop"
    # files (destinations/<name>/ in the output directory) | kafka | webhook | pubsub
    delivery: DeliveryConfig = DeliveryConfig()


@dataclass(frozen=True)
class PiiConfig:
    # Salt for `hash`; the CDI_PII_SALT environment variable overrides it. Never logged.
    salt: str | None = None
    # Classification rules (transforms.pii.PiiRule: pii_class, paths, pattern, key_pattern);
    # empty = the built-in rules (email, phone, ip, free_text).
    rules: tuple[PiiRule, ...] = ()


@dataclass(frozen=True)
class ConsentConfig:
    purposes: tuple[str, ...] = ("analytics", "marketing", "advertising")
    destinations: dict[str, DestinationConfig] = field(default_factory=dict)

    def __post_init__(self):
        if "profiles" in self.destinations:
            raise ValueError("'profiles' is reserved: set sinks.profiles.purposes and .pii instead")
        # The per-person stage's other outputs share its tags with the destinations.
        taken = sorted(
            {"fragments", "consent_denied", "deleted", "failed"} & set(self.destinations)
        )
        if taken:
            raise ValueError(
                f"{taken[0]!r} is reserved for an output of the job: rename the destination"
            )


@dataclass(frozen=True)
class PrivacyConfig:
    # Identifiers whose persons are deleted and suppressed, as "type:value" (user_id:u_123).
    deleted_identifiers: tuple[str, ...] = ()

    def __post_init__(self):
        for item in self.deleted_identifiers:
            if ":" not in item:
                raise ValueError(f"deleted_identifiers: {item!r} must be 'type:value'")


@dataclass(frozen=True)
class AudienceConfig:
    # A slug: the audience trait and `audience_key` of its records.
    name: str
    # When a person is in: a predicate over the profile (transforms/audiences.py), e.g.
    # {computed: orders_lifetime, gte: 3} or {all: [..]}, {any: [..]}, {not: ..}.
    when: Any
    # Where entries and exits go; each destination's consent purposes join the predicate.
    destinations: tuple[str, ...] = ()

    def __post_init__(self):
        from transforms.audiences import SLUG, compile_predicate

        if not SLUG.match(self.name):
            raise ValueError(f"name: {self.name!r} is not a slug (a-z, 0-9, _; a letter first)")
        compile_predicate(self.when, "when")


@dataclass(frozen=True)
class TriggerConfig:
    # A slug: the trigger's name in its records.
    name: str
    destinations: tuple[str, ...] = ()
    # An event trigger: a track event name, and optionally a predicate over its properties
    # ({property: amount, gt: 100}; the audiences' operators and all/any/not).
    event: str | None = None
    where: Any = None
    # A threshold trigger: a predicate over the profile (as an audience's `when`); fires each
    # time it becomes true.
    when: Any = None

    def __post_init__(self):
        from transforms.audiences import EVENT_SUBJECTS, SLUG, compile_predicate

        if not SLUG.match(self.name):
            raise ValueError(f"name: {self.name!r} is not a slug (a-z, 0-9, _; a letter first)")
        if (self.event is None) == (self.when is None):
            raise ValueError("a trigger has either `event` (and `where`) or `when`")
        if self.where is not None:
            if self.event is None:
                raise ValueError("where: only with `event`")
            compile_predicate(self.where, "where", EVENT_SUBJECTS)
        if self.when is not None:
            compile_predicate(self.when, "when")


StoreType = Literal["sqlite", "postgres", "redis", "bigquery"]


@dataclass(frozen=True)
class ProfileStoreConfig:
    """One profile store (transforms/profile_store.py; adapters in transforms/io/)."""

    type: StoreType = "sqlite"
    # postgres: postgresql://user@host:port/db; redis: redis://host:port/db; bigquery:
    # bigquery://project/dataset.table. ${VAR} is read from the environment when the store is
    # opened (credentials stay out of the file and out of logs).
    url: str | None = None
    # sqlite: the file, relative to the output directory.
    path: str = "profiles.sqlite"
    # Rows per write (a bundle writes at least once at its end); unset: the store's own default
    # (SQLite 5,000 rows per transaction, the others 500; transforms/io/).
    batch_size: int | None = None

    def __post_init__(self):
        if self.type not in ("sqlite", "bigquery") and not self.url:
            raise ValueError(f"url: a {self.type} store needs a url")
        if self.type == "bigquery" and not (self.url or "").startswith("bigquery://"):
            raise ValueError("url: a bigquery store's url is bigquery://project/dataset.table")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size: must be at least 1")


@dataclass(frozen=True)
class ProfileSinkConfig:
    # The profile store, and any more it is also written to (``also``): each gets every row.
    type: StoreType = "sqlite"
    url: str | None = None
    # Relative to the output directory.
    path: str = "profiles.sqlite"
    batch_size: int | None = None  # as ProfileStoreConfig's
    also: tuple[ProfileStoreConfig, ...] = ()
    # Consent purposes an event needs to be folded into a profile (none by default: the profile
    # store is the system of record; deletion applies regardless).
    purposes: tuple[str, ...] = ()
    # PII policy for what the profile store keeps (traits, identities).
    pii: dict[str, PiiAction] = field(default_factory=dict)
    pii_default: PiiAction = "keep"

    def __post_init__(self):
        ProfileStoreConfig(self.type, self.url, self.path, self.batch_size)  # same checks

    def stores(self) -> tuple[ProfileStoreConfig, ...]:
        return (ProfileStoreConfig(self.type, self.url, self.path, self.batch_size), *self.also)


@dataclass(frozen=True)
class ArchiveConfig:
    # Where the raw input is archived (Avro, <path>/<source>.<YYYY-MM-DDTHH>-*.avro by event hour),
    # relative to the current directory or any Beam filesystem (gs://...); none: no archive.
    # `cdi replay --from-archive PATH` reads it back through the same job.
    path: str | None = None


@dataclass(frozen=True)
class SinksConfig:
    output_dir: str = "cdi-output"
    profiles: ProfileSinkConfig = ProfileSinkConfig()
    archive: ArchiveConfig = ArchiveConfig()


@dataclass(frozen=True)
class PipelineConfig:
    sources: tuple[SourceConfig, ...]
    tracking_plans: dict[str, TrackingPlanRef] = field(default_factory=dict)
    validation: ValidationConfig = ValidationConfig()
    event_time: EventTimeConfig = EventTimeConfig()
    dedup: DedupConfig = DedupConfig()
    windows: WindowsConfig = WindowsConfig()
    profile: ProfileConfig = ProfileConfig()
    computed_traits: tuple[ComputedTraitConfig, ...] = ()
    identity: IdentityConfig = IdentityConfig()
    consent: ConsentConfig = ConsentConfig()
    pii: PiiConfig = PiiConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    audiences: tuple[AudienceConfig, ...] = ()
    triggers: tuple[TriggerConfig, ...] = ()
    sinks: SinksConfig = SinksConfig()
    # Directory the config file lives in: relative paths resolve against it. Not a YAML key.
    base_dir: str = field(default=".", metadata={"internal": True})
    # The file it was read from, as given: the first word of every configuration error.
    filename: str = field(default="config", metadata={"internal": True})

    def __post_init__(self):
        if not self.sources:
            raise ValueError("sources: at least one source is required")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: source names must be unique, got {names}")
        traits = [t.name for t in self.computed_traits]
        if len(set(traits)) != len(traits):
            raise ValueError(f"computed_traits: names must be unique, got {traits}")

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p


# --- loading -----------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if tp is Duration:
        return "duration"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin in (tuple, list):
        return "list"
    if origin in (dict, Mapping):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _instants_as_text(data: Any) -> Any:
    """YAML reads an unquoted instant (``2015-01-01``, ``2024-01-01T00:00:00Z``) as a date or
    datetime; what the key means is the instant as written (YAML's naive times are UTC)."""
    if isinstance(data, dt.date):
        if isinstance(data, dt.datetime) and data.tzinfo is None:
            data = data.replace(tzinfo=dt.timezone.utc)
        return data.isoformat()
    if isinstance(data, dict):
        return {k: _instants_as_text(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_instants_as_text(v) for v in data]
    return data


class _Loader:
    """Walks YAML data against the dataclass type hints, collecting every problem with its path."""

    def __init__(self, filename: str):
        self.filename = filename
        self.problems: list[str] = []

    def problem(self, path: str, reason: str) -> None:
        self.problems.append(f"{self.filename}: {path or '<root>'}: {reason}")

    def build(self, tp: Any, data: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if data is None:
                return None
            return self.build(args[0], data, path)
        if tp is Any:
            return _instants_as_text(data)
        if dataclasses.is_dataclass(tp):
            return self.build_dataclass(tp, data, path)
        if origin is Literal:
            choices = typing.get_args(tp)
            if data not in choices:
                hint = difflib.get_close_matches(str(data), [str(c) for c in choices], n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                self.problem(
                    path, f"must be one of {', '.join(map(repr, choices))}, got {data!r}{extra}"
                )
            return data
        if tp is Duration:
            if isinstance(data, (int, float)) and not isinstance(data, bool):
                self.problem(path, f"duration needs a unit, e.g. '{data}s' or '{data}m'")
                return None
            try:
                return Duration.parse(data)
            except ValueError as e:
                self.problem(path, str(e))
                return None
        if origin is tuple:
            if not isinstance(data, list):
                self.problem(path, f"expected a list, got {type(data).__name__} {data!r}")
                return ()
            (item_tp, *_) = typing.get_args(tp)
            return tuple(self.build(item_tp, v, f"{path}[{i}]") for i, v in enumerate(data))
        if origin is dict:
            if not isinstance(data, dict):
                self.problem(path, f"expected a mapping, got {type(data).__name__} {data!r}")
                return {}
            key_tp, val_tp = typing.get_args(tp)
            return {str(k): self.build(val_tp, v, f"{path}.{k}") for k, v in data.items()}
        if tp is float:
            if isinstance(data, (int, float)) and not isinstance(data, bool):
                return float(data)
        elif tp is int:
            if isinstance(data, int) and not isinstance(data, bool):
                return data
        elif tp is bool or tp is str:
            if isinstance(data, tp):
                return data
            if tp is str and isinstance(data, dt.date):
                return _instants_as_text(data)
        else:  # pragma: no cover - a model type the loader does not know is a programming error
            raise TypeError(f"unsupported config type {tp!r} at {path}")
        self.problem(path, f"expected {_type_name(tp)}, got {type(data).__name__} {data!r}")
        return None

    def build_dataclass(self, cls: type, data: Any, path: str) -> Any:
        if not isinstance(data, dict):
            self.problem(path, f"expected a mapping, got {type(data).__name__} {data!r}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        before = len(self.problems)
        for key in data:
            if key not in fields and (cls, key) in REPLACED_KEYS:
                self.problem(f"{path}.{key}" if path else str(key), REPLACED_KEYS[(cls, key)])
            elif key not in fields:
                hint = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
                extra = (
                    f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {', '.join(fields)}"
                )
                self.problem(f"{path}.{key}" if path else str(key), f"unknown key{extra}")
        kwargs = {}
        for name, f in fields.items():
            sub = f"{path}.{name}" if path else name
            if name in data:
                kwargs[name] = self.build(hints[name], data[name], sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.problem(sub, "required key is missing")
        if len(self.problems) > before:
            return None
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            self.problem(path, str(e))
            return None


def load_config_text(text: str, filename: str, base_dir: str | Path) -> PipelineConfig:
    loader = _Loader(filename)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{filename}: <root>: not valid YAML: {e}"]) from None
    if data is None:
        data = {}
    cfg = loader.build(PipelineConfig, data, "")
    if cfg is not None:
        cfg = dataclasses.replace(cfg, base_dir=str(base_dir), filename=filename)
        _check_references(cfg, loader)
    if loader.problems:
        raise ConfigError(loader.problems)
    return cfg


def _check_references(cfg: PipelineConfig, loader: _Loader) -> None:
    """Cross-field checks: referenced plans, files and purposes exist."""
    for name, ref in cfg.tracking_plans.items():
        if not cfg.resolve(ref.path).is_file():
            loader.problem(
                f"tracking_plans.{name}.path", f"file not found: {cfg.resolve(ref.path)}"
            )
    for i, src in enumerate(cfg.sources):
        if src.tracking_plan is None and src.violations:
            loader.problem(
                f"sources[{i}].violations",
                "the source has no tracking_plan, so there are no plan rules to relax",
            )
        if src.tracking_plan is not None and src.tracking_plan not in cfg.tracking_plans:
            hint = difflib.get_close_matches(src.tracking_plan, list(cfg.tracking_plans), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            loader.problem(
                f"sources[{i}].tracking_plan",
                f"no tracking plan named {src.tracking_plan!r} in tracking_plans{extra}",
            )
    for dname, dest in cfg.consent.destinations.items():
        for j, purpose in enumerate(dest.purposes):
            if purpose not in cfg.consent.purposes:
                loader.problem(
                    f"consent.destinations.{dname}.purposes[{j}]",
                    f"unknown purpose {purpose!r}; declared purposes: {', '.join(cfg.consent.purposes)}",
                )
    for j, purpose in enumerate(cfg.sinks.profiles.purposes):
        if purpose not in cfg.consent.purposes:
            loader.problem(f"sinks.profiles.purposes[{j}]", f"unknown purpose {purpose!r}")
    id_types = {t.name for t in cfg.identity.types}
    for j, item in enumerate(cfg.privacy.deleted_identifiers):
        if item.split(":", 1)[0] not in id_types:
            loader.problem(
                f"privacy.deleted_identifiers[{j}]",
                f"unknown identifier type {item.split(':', 1)[0]!r}; types: {', '.join(sorted(id_types))}",
            )
    for kind, items in (("audiences", cfg.audiences), ("triggers", cfg.triggers)):
        for i, item in enumerate(items):
            for j, d in enumerate(item.destinations):
                if d not in cfg.consent.destinations:
                    loader.problem(f"{kind}[{i}].destinations[{j}]", f"unknown destination {d!r}")
    names = [a.name for a in cfg.audiences] + [t.name for t in cfg.triggers]
    for name in sorted({n for n in names if names.count(n) > 1}):
        loader.problem("audiences", f"the name {name!r} is used twice (audiences and triggers)")


def load_config(path: str | Path) -> PipelineConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"{p}: <root>: config file not found"])
    return load_config_text(p.read_text(encoding="utf-8"), str(p), p.resolve().parent)


DEFAULT_CONFIG = "default.yaml"


def default_config_path() -> Path:
    """The embedded default config, shipped as package data."""
    return Path(str(resources.files("schemas") / "configs" / DEFAULT_CONFIG))


def load_default_config() -> PipelineConfig:
    return load_config(default_config_path())
