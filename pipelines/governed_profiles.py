"""The main job: governed events in, unified profiles and typed side outputs out.

    sources -> ValidateEvents -> DeduplicateEvents -+-> StitchIdentities ------------+
                   |                  |             |                                v
                   quarantine <-------+-duplicates  +-> KeyByProfile -> (per person) UnifyProfiles
                                                                            |              |
                       consent_denied, deleted, destinations (PII per destination)  profile sink

Per person, streaming runs chain EnforceConsent (events held until the watermark passes them),
RedactPerDestination, ComputeTraits (windowed panes, ``late``) and BuildProfiles, each with keyed
state; bounded runs do the same in one grouped pass (``PersonHistory``).

``build(p, config, inputs)`` wires the graph and returns its outputs by name, so tests drive it
without a CLI; ``write_outputs`` attaches the sinks of the output-directory contract (README).
Step labels are fixed: they and the state names are part of the streaming update contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions

from pipelines.config import PipelineConfig, parse_instant
from transforms.audiences import (
    ActivateAudiences,
    Audience,
    DestinationRedactor,
    EventTrigger,
    FireEventTriggers,
    SkipDelivered,
    TriggerEvents,
)
from transforms.computed_traits import LATE, ComputedTraitSpec, ComputeTraits
from transforms.consent import (
    DELETED,
    PROFILES_CONSENT,
    PROFILES_DELETE,
    DestinationRule,
    EnforceConsent,
)
from transforms.consent import DENIED as CONSENT_DENIED
from transforms.dead_letter import (
    FAILED,
    CountEventsOnce,
    ElementDeadLetters,
    EventDeadLetters,
    all_or_dead_letter,
    guarded,
    one_or_dead_letter,
)
from transforms.dedup import DeduplicateEvents
from transforms.identity import primary_profile_key
from transforms.io.files import ArchiveRawInput, ReadArchive, ReadFileSource, ReadPlannedParts
from transforms.io.kafka import ReadKafka
from transforms.person_history import FRAGMENTS, PersonHistory, delivery_record
from transforms.pii import DEFAULT_RULES, PiiRule, Redaction, needs_salt, resolve_salt
from transforms.planned_parts import (
    BLOCKED,
    FAILED_DEDUP,
    FAILED_GROUPS,
    FAILED_HISTORY,
    FAILED_KEY,
    FAILED_PART,
    FAILED_STITCH_EVENTS,
    FAILED_UNIFY,
    FAILED_VALIDATE,
    UNIQUE,
    SettlePlannedParts,
    destination_tag,
)
from transforms.profile import PROFILES as PROFILE_FRAGMENTS
from transforms.profile import BuildProfiles, TraitRules
from transforms.profile_store import StoreSpec, WriteProfiles
from transforms.quarantine import DUPLICATES, QUARANTINE
from transforms.sinks import WriteRecordsAsJson
from transforms.stitching import (
    FAILED_EVENTS,
    MERGES,
    REVIEW,
    UNLINK_TYPE,
    StitchIdentities,
    report_blocked,
)
from transforms.tracking_plan import load_plan
from transforms.unify import (
    ROWS,
    TRIGGERED,
    IdentifierRedactor,
    UnifyProfiles,
    without_activation_fields,
)
from transforms.validate import ValidateEvents

# Output names: the keys of build()'s result and the directories of the output contract.
VALID, PROFILES = "valid", "profiles"
OUTPUTS = (
    VALID,
    QUARANTINE,
    DUPLICATES,
    LATE,
    CONSENT_DENIED,
    DELETED,
    PROFILES,
    MERGES,
    REVIEW,
)


def kafka_read(p: beam.Pipeline, src, bounded: bool, drain_file: str | None) -> beam.PTransform:
    """The Kafka reader: continuous in a streaming run (unless `stop` bounds it); Beam's
    cross-language reader only where its Java transform can run (transforms/io/kafka.py)."""
    runner = str(p.options.view_as(StandardOptions).runner or "")
    if src.kafka.reader == "beam" and (bounded or "Prism" in runner):
        from pipelines.config import ConfigError

        raise ConfigError(
            [
                f"sources.{src.name}.kafka.reader: beam reads in --streaming runs on Flink or "
                "Dataflow (the Java transform needs their environment); locally use "
                "reader: native"
            ]
        )
    return ReadKafka(src.name, src.kafka, continuous=not bounded, drain_file=drain_file)


def pubsub_read(p: beam.Pipeline, src, drain_file: str | None = None) -> beam.PTransform:
    """Beam's ReadFromPubSub on Dataflow, the native reader on any other runner; streaming runs
    only (transforms/io/pubsub.py; :func:`build` refuses a pubsub source in a batch run)."""
    from transforms.io.pubsub import ReadPubSubNative, ReadPubSubSource

    options = p.options.view_as(StandardOptions)
    if "Dataflow" in str(options.runner or ""):
        return ReadPubSubSource(src.name, src.pubsub)
    return ReadPubSubNative(src.name, src.pubsub, drain_file)


def source_inputs(
    config: PipelineConfig, override: list[str] | None = None
) -> dict[str, list[str]]:
    """Input globs per file source: ``--input`` replaces the first file source's paths."""
    files = [s for s in config.sources if s.type == "files"]
    out = {s.name: [str(config.resolve(p)) for p in s.paths] for s in files}
    if override:
        if not files:
            from pipelines.config import ConfigError

            raise ConfigError(["--input: the config has no file source to read it"])
        out[files[0].name] = list(override)
    return out


PROFILES_DESTINATION = "profiles"
DESTINATIONS = "destinations"


def destination_rules(config: PipelineConfig) -> list[DestinationRule]:
    rules = [DestinationRule(PROFILES_DESTINATION, tuple(config.sinks.profiles.purposes))]
    rules += [DestinationRule(n, tuple(d.purposes)) for n, d in config.consent.destinations.items()]
    return rules


def pii_policies(config: PipelineConfig) -> dict[str, tuple[dict, str]]:
    """Destination -> (policy, default action), the profile sink included."""
    out = {
        PROFILES_DESTINATION: (dict(config.sinks.profiles.pii), config.sinks.profiles.pii_default)
    }
    for name, d in config.consent.destinations.items():
        out[name] = (dict(d.pii), d.pii_default)
    return out


def pii_rules(config: PipelineConfig) -> tuple[PiiRule, ...]:
    return config.pii.rules or DEFAULT_RULES


def pii_salt(config: PipelineConfig) -> str:
    """The salt (environment first); raises ValueError when a policy hashes and none is set."""
    policies = pii_policies(config).values()
    required = any(needs_salt(p, default) for p, default in policies)
    return resolve_salt(config.pii.salt, required=required)


def identifier_redactor(config: PipelineConfig, rules, policy, default, salt):
    """The profile row's identity list as the profile sink's PII policy allows it."""
    return IdentifierRedactor.for_identity(config.identity, rules, policy, default, salt)


def key_by_profile(env, identity) -> tuple[str, Any]:
    """``(profile key, envelope)``. Validation keeps only events with a usable identifier, by
    the same rule, so a key is always found; were it not, the event is a dead letter here
    rather than a ``None`` key that fails a later step for the whole person."""
    key = primary_profile_key(env.event, identity, env.identifiers)
    if key is None:
        raise ValueError("no usable identifier to key the event by")
    return key, env


def build(
    p: beam.Pipeline,
    config: PipelineConfig,
    inputs: dict[str, list[str]],
    bounded: bool | None = None,
    archive_globs: list[str] | None = None,
    drain_file: str | None = None,
    now_ms: int | None = None,
    archive_input: bool = False,
    by_part: bool = False,
) -> dict:
    """Wire the governed path; returns ``{name: PCollection}`` for the names in :data:`OUTPUTS`
    plus ``destinations``: ``{destination name: PCollection of delivery record lists}``.
    ``consent_denied``, ``deleted`` and the destinations carry *lists* of records (one per person
    in bounded runs, one record each in streaming); the other outputs carry records.

    ``bounded``: use the bounded-input stages (each keyed stage a GroupByKey and one call per
    key) instead of the streaming ones (keyed state and timers). Default: bounded exactly when
    the pipeline is not streaming. Tests pass ``False`` to run the streaming stages over a
    finite input and compare both. ``archive_globs``: read these raw-input archive files
    instead of the configured sources (a replay; nothing is archived again, unless
    ``archive_input``: the passes of one run read their input from such files). ``drain_file``: a
    streaming run's Kafka sources stop reading when this path exists (``cdi run --streaming``
    creates it on SIGINT/SIGTERM). ``by_part``: ``archive_globs`` are a planned run's pass
    files (pipelines/passes.py), each part of the input whole in one file: each part is read
    whole, then validated, deduplicated and settled in one call (transforms/planned_parts.py)
    instead of the stages."""
    plans = tracking_plans(config)
    salt = pii_salt(config)
    rules = pii_rules(config)
    policies = pii_policies(config)
    if bounded is None:
        bounded = not p.options.view_as(StandardOptions).streaming
    planned = by_part and bounded
    if planned:
        raw = None  # a planned pass reads its files part by part (below)
    elif archive_globs is not None:  # a replay of the raw-input archive (cdi replay)
        raw = p | "ReadArchive" >> ReadArchive(archive_globs)
    else:
        reads = []
        for src in config.sources:
            if src.type == "kafka":
                read = kafka_read(p, src, bounded, drain_file)
            elif src.type == "pubsub":
                if bounded:
                    from pipelines.config import ConfigError

                    where = f"{config.filename}: sources[{config.sources.index(src)}]"
                    raise ConfigError([f"{where}: a pubsub source is read with --streaming"])
                read = pubsub_read(p, src, drain_file)
            else:
                read = ReadFileSource(src.name, src.format, inputs[src.name])
            reads.append(p | f"Read[{src.name}]" >> read)
        raw = reads[0] if len(reads) == 1 else tuple(reads) | "MergeSources" >> beam.Flatten()
    if config.sinks.archive.path and (archive_globs is None or archive_input):
        if not bounded:
            from pipelines.config import ConfigError

            raise ConfigError(["sinks.archive.path: archives bounded runs only in this release"])
        if raw is None:
            raw = p | "ReadArchive" >> ReadArchive(archive_globs)
        raw | "ArchiveRawInput" >> ArchiveRawInput(config.sinks.archive.path, run_id())

    validate = _validate(config, plans, now_ms)
    identity = config.identity
    specs = [ComputedTraitSpec.from_config(c) for c in config.computed_traits]
    trait_rules = TraitRules(
        frozenset(config.profile.set_once), frozenset(config.profile.increment)
    )
    event_triggers = [EventTrigger.from_config(t) for t in config.triggers if t.event]
    # Event triggers fire on events as delivered to their destinations (consent and PII
    # applied), then meet the person's current profile in UnifyProfiles.
    fired_on = sorted({d for t in event_triggers for d in t.destinations})
    trait_kinds = {c.name: c.aggregate for c in config.computed_traits}
    redact_profile = identifier_redactor(config, rules, *policies[PROFILES_DESTINATION], salt)
    if planned:
        # A planned run's pass: each part validated, deduplicated and settled in one call
        # (transforms/planned_parts.py), read part by part from its files.
        settled = (
            p
            | "ReadPlannedParts" >> ReadPlannedParts(archive_globs)
            | "SettlePlannedParts"
            >> SettlePlannedParts(
                validate,
                config.dedup.key,
                identity,
                config.privacy.deleted_identifiers,
                destination_rules(config),
                (rules, policies, salt),
                PROFILES_DESTINATION,
                specs,
                trait_rules,
                trait_kinds,
                redact_profile,
                key_by_profile,
                event_triggers,
                fired_on,
            )
        )
        unique, duplicates = settled[UNIQUE], settled[DUPLICATES]
        before_dedup = [
            settled[QUARANTINE],
            settled[FAILED_VALIDATE]
            | "DeadLetters[validate]" >> EventDeadLetters("validate", raw=True),
            settled[FAILED_DEDUP] | "DeadLetters[dedup]" >> EventDeadLetters("dedup"),
            # A part's call that raised outside every stage's guard: each of its raw events.
            settled[FAILED]
            | "EachRawEvent" >> beam.FlatMap(lambda dl: [(r, dl[1]) for r in dl[0][1]])
            | "DeadLetters[part raw]" >> EventDeadLetters("part", raw=True),
        ]
        stitched = {
            MERGES: settled[MERGES],
            REVIEW: (settled[REVIEW], report_blocked(settled[BLOCKED]))
            | "MergeReview" >> beam.Flatten(),
            FAILED: settled[FAILED_GROUPS],
        }
        failed_events = [
            ("key", settled[FAILED_KEY]),
            ("stitching", settled[FAILED_STITCH_EVENTS]),
            ("person_history", settled[FAILED_HISTORY]),
            # A part whose resolution raised outside a stage's function: each unique event.
            ("part", settled[FAILED_PART]),
        ]
        destinations = {
            name: settled[destination_tag(name)] for name in config.consent.destinations
        }
        denied, deleted = settled[CONSENT_DENIED], settled[DELETED]
        late = p | "NoLateEvents" >> beam.Create([])
        unified = {
            ROWS: settled[ROWS],
            TRIGGERED: settled[TRIGGERED],
            FAILED: settled[FAILED_UNIFY],
        }
    else:
        validated = raw | "ValidateEvents" >> validate
        deduped = validated.valid | "DeduplicateEvents" >> DeduplicateEvents(
            config.dedup.key, config.dedup.ttl, bounded=bounded
        )
        unique, duplicates = deduped["unique"], deduped[DUPLICATES]
        before_dedup = [
            validated[QUARANTINE],
            deduped[QUARANTINE],
            validated[FAILED] | "DeadLetters[validate]" >> EventDeadLetters("validate", raw=True),
            deduped[FAILED] | "DeadLetters[dedup]" >> EventDeadLetters("dedup"),
        ]
        stitched, unified, destinations, denied, deleted, late, failed_events = _in_stages(
            p, unique, config, bounded, (rules, policies, salt), specs, trait_rules,
            event_triggers, fired_on, trait_kinds, redact_profile,
        )  # fmt: skip
    profiles = unified[ROWS]
    activation_failed = []
    # Audiences and threshold triggers: entries and exits from the profile rows
    # (transforms/audiences.py), to their destinations under each one's consent and PII policy.
    audiences = [Audience.from_config(a) for a in config.audiences] + [
        Audience.from_trigger(t) for t in config.triggers if t.when is not None
    ]
    used = sorted(
        {d for a in audiences for d in a.destinations}
        | {d for t in event_triggers for d in t.destinations}
    )
    redactor = DestinationRedactor(
        rules,
        {d: policies[d] for d in used},
        salt,
        {d: identifier_redactor(config, rules, *policies[d], salt) for d in used},
    )
    activation_outputs = []
    if audiences:
        activated = profiles | "ActivateAudiences" >> ActivateAudiences(
            audiences,
            {n: tuple(d.purposes) for n, d in config.consent.destinations.items()},
            redactor,
            bounded=bounded,
        )
        activation_outputs.append(activated)
        activation_failed.append(activated[FAILED])
    if event_triggers:
        fired = unified[TRIGGERED] | "FireEventTriggers" >> FireEventTriggers(
            redactor, {d for t in event_triggers for d in t.destinations}
        )
        activation_outputs.append(fired)
        activation_failed.append(fired[FAILED])
    for d in used:
        extra = [out[d] for out in activation_outputs if d in out]
        if extra:
            destinations[d] = (destinations[d], *extra) | f"Activations[{d}]" >> beam.Flatten()

    # Every dead letter becomes a quarantine record (transforms/dead_letter.py): events before
    # dedup are counted at once, events after it once each however many steps failed on them,
    # other elements (identifier groups, persons) per stage, apart from the event accounting.
    key_paths = tuple(config.dedup.key)
    after_dedup = [
        dead | f"DeadLetters[{stage}]" >> EventDeadLetters(stage, after_dedup=key_paths)
        for stage, dead in failed_events
    ]
    quarantine = (
        *before_dedup,
        tuple(after_dedup)
        | "MergeDeadLettersAfterDedup" >> beam.Flatten()
        | "CountEventsOnce" >> CountEventsOnce(config.dedup.ttl),
        stitched[FAILED]
        | "DeadLetters[identifier groups]" >> ElementDeadLetters("stitching", "identifier group"),
        unified[FAILED] | "DeadLetters[unify]" >> ElementDeadLetters("unify", "person"),
        *(
            [
                tuple(activation_failed)
                | "MergeActivationFailed" >> beam.Flatten()
                | "WithoutRawIdentifiers" >> beam.Map(without_raw_identifiers)
                | "DeadLetters[activation]" >> ElementDeadLetters("activation", "person")
            ]
            if activation_failed
            else []
        ),
    ) | "MergeQuarantine" >> beam.Flatten()
    return {
        VALID: unique,
        QUARANTINE: quarantine,
        DUPLICATES: duplicates,
        LATE: late,
        CONSENT_DENIED: denied,
        DELETED: deleted,
        PROFILES: profiles,
        MERGES: stitched[MERGES],
        REVIEW: stitched[REVIEW],
        DESTINATIONS: destinations,
    }


def _in_stages(
    p, unique, config, bounded, pii, specs, trait_rules, event_triggers, fired_on, trait_kinds,
    redact_profile,
):  # fmt: skip
    """Everything after dedup in keyed stages: StitchIdentities, the per-person stage
    (PersonHistory, or the streaming chain) and UnifyProfiles; returns ``(stitched, unified,
    destinations, consent_denied, deleted, late, the event dead letters by stage)``."""
    identity = config.identity
    rules, policies, salt = pii
    stitched = unique | "StitchIdentities" >> StitchIdentities(
        identity, config.privacy.deleted_identifiers, identity.rounds, bounded=bounded
    )
    behaviour = unique | "DropUnlinks" >> beam.Filter(
        lambda env: env.event.get("type") != UNLINK_TYPE
    )
    keyed = behaviour | "KeyByProfile" >> guarded(
        beam.FlatMap(one_or_dead_letter(key_by_profile), identity).with_output_types(
            beam.typehints.KV[str, Any]
        )
    )
    # Dead letters of the steps after dedup that carry events (stage, dead letters).
    failed_events = [("key", keyed[FAILED]), ("stitching", stitched[FAILED_EVENTS])]
    keyed = keyed.good
    if bounded:
        # One pass per person: consent, per-destination PII, computed traits and the profile
        # fragment (transforms/person_history.py); record outputs come in per-person lists.
        history = keyed | "PersonHistory" >> PersonHistory(
            destination_rules(config),
            config.privacy.deleted_identifiers,
            identity,
            (rules, policies, salt),
            PROFILES_DESTINATION,
            specs,
            trait_rules,
        )
        profile_fragments = history[FRAGMENTS]
        destinations = {name: history[name] for name in config.consent.destinations}
        denied, deleted = history[CONSENT_DENIED], history[DELETED]
        late = p | "NoLateEvents" >> beam.Create([])
        failed_events.append(("person_history", history[FAILED]))
    else:
        profile_fragments, destinations, denied, deleted, late, failed = _streaming_profiles(
            keyed, config, (rules, policies, salt), specs, trait_rules
        )
        failed_events += failed
    unify_in = {
        "fragments": profile_fragments,
        "assignments": stitched["assignments"],
        "identities": stitched["identities"],
    }
    if event_triggers:
        unify_in["triggers"] = (
            tuple(
                destinations[d] | f"TriggerEvents[{d}]" >> TriggerEvents(event_triggers)
                for d in fired_on
            )
            | "MergeTriggerEvents" >> beam.Flatten()
        )
    unified = unify_in | "UnifyProfiles" >> UnifyProfiles(
        trait_kinds, bounded=bounded, redact=redact_profile
    )
    return stitched, unified, destinations, denied, deleted, late, failed_events


def _streaming_profiles(keyed, config: PipelineConfig, pii, specs, trait_rules):
    """The streaming chain: stateful consent (events held until the watermark passes them), the
    fan-out redacted per destination, windowed computed traits with a late output, and profile
    fragments. Returns ``(fragments, {destination: record lists}, denied lists, deleted lists,
    late records, [(stage, dead letters)])``; record outputs are one-record lists, the same
    contract as bounded runs."""
    redaction = Redaction(*pii)
    identity = config.identity
    consent = keyed | "EnforceConsent" >> EnforceConsent(
        destination_rules(config),
        config.privacy.deleted_identifiers,
        identity,
        profiles=PROFILES_DESTINATION,
    )

    def redact_per_destination(delivery):
        """Each delivery straight to its destination's output, as that destination's PII policy
        allows it (the event is classified once for all of them)."""
        names, key, env = delivery
        if env is None:
            yield beam.pvalue.TaggedOutput(PROFILES_DELETE, (key, None))
            return
        if names == (PROFILES_CONSENT,):
            yield beam.pvalue.TaggedOutput(PROFILES_CONSENT, (key, env))
            return
        events = redaction.apply(env.event, names)
        for name in names:
            redacted = env._replace(event=events[name])
            if name == PROFILES_DESTINATION:
                yield beam.pvalue.TaggedOutput(name, (key, redacted))
            else:
                yield beam.pvalue.TaggedOutput(name, [delivery_record(name, key, redacted)])

    delivered = consent.delivered | "RedactPerDestination" >> guarded(
        beam.FlatMap(all_or_dead_letter(redact_per_destination)),
        PROFILES_DESTINATION,
        PROFILES_DELETE,
        PROFILES_CONSENT,
        *config.consent.destinations,
        main="main",
    )
    failed = [("consent", consent[FAILED]), ("pii", delivered[FAILED])]
    to_profiles = delivered[PROFILES_DESTINATION]
    fragments = {
        "events": to_profiles,
        "deletes": delivered[PROFILES_DELETE],
        "consent": delivered[PROFILES_CONSENT],
    }
    if specs:
        traits = to_profiles | "ComputeTraits" >> ComputeTraits(
            specs, int(config.windows.allowed_lateness * 1000)
        )
        fragments["computed"] = traits.computed
        late = traits[LATE]
        failed.append(("computed_traits", traits[FAILED]))
    else:
        late = keyed.pipeline | "NoLateEvents" >> beam.Create([])
    built = fragments | "BuildProfiles" >> BuildProfiles(
        identity,
        trait_rules,
        config.profile.update_every,
        as_rows=False,
        redact=identifier_redactor(config, pii[0], *pii[1][PROFILES_DESTINATION], pii[2]),
    )
    failed.append(("profile", built[FAILED]))
    destinations = {name: delivered[name] for name in config.consent.destinations}
    return (
        built[PROFILE_FRAGMENTS],
        destinations,
        consent[CONSENT_DENIED] | "DeniedAsLists" >> beam.Map(lambda r: [r]),
        consent[DELETED] | "DeletedAsLists" >> beam.Map(lambda r: [r]),
        late,
        failed,
    )


def tracking_plans(config: PipelineConfig) -> dict:
    return {
        name: load_plan(config.resolve(ref.path)) for name, ref in config.tracking_plans.items()
    }


def _validate(config: PipelineConfig, plans, now_ms: int | None = None):
    """The validation stage; ``now_ms``: a fixed read time (the passes of one run share their
    planning time), else each event's read time."""
    clock = {} if now_ms is None else {"clock": lambda: now_ms / 1000}
    return ValidateEvents(
        {s.name: plans.get(s.tracking_plan) for s in config.sources},
        config.identity,
        max_event_bytes=config.validation.max_event_bytes,
        max_depth=config.validation.max_depth,
        max_future_skew_ms=int(config.event_time.max_future_skew * 1000),
        floor_ms=int(parse_instant(config.event_time.min_event_time) * 1000),
        clamp_event_time=config.event_time.on_invalid == "clamp",
        rule_modes={s.name: dict(s.violations) for s in config.sources},
        **clock,
    )


def output_paths(config: PipelineConfig, output_dir: str | Path) -> dict[str, Path]:
    out = Path(output_dir)
    return {
        PROFILES: out / config.sinks.profiles.path,
        QUARANTINE: out / "quarantine",
        DUPLICATES: out / "duplicates",
        LATE: out / "late",
        CONSENT_DENIED: out / "consent_denied",
        DELETED: out / "deleted",
        MERGES: out / "merges",
        REVIEW: out / "identity_review",
        DESTINATIONS: out / "destinations",
        "report": out / "run_report.json",
    }


def profile_stores(config: PipelineConfig, output_dir: str | Path) -> list[StoreSpec]:
    """The profile stores a run writes (``sinks.profiles`` and its ``also``)."""
    return [
        StoreSpec(
            s.type,
            url=s.url,
            path=str(Path(output_dir) / s.path) if s.type == "sqlite" else None,
            batch_size=s.batch_size,
        )
        for s in config.sinks.profiles.stores()
    ]


def without_raw_identifiers(dead_letter):
    """An activation dead letter without the row's raw identifiers (quarantine records keep
    what the profile store keeps)."""
    element, error = dead_letter
    if isinstance(element, tuple):
        element = tuple(map(without_activation_fields, element))
    return element, error


def run_id() -> str:
    """Unique per pipeline construction (a run): UTC time and randomness, sortable."""
    import datetime as dt
    import secrets

    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + secrets.token_hex(4)


def activation_ledger(config: PipelineConfig, output_dir: str | Path) -> StoreSpec | None:
    """Where activation keys are claimed (transforms/audiences.py): the first profile store
    that is a database (PostgreSQL, Redis, SQLite). Runs and replays writing the same store share
    it; a run's own SQLite file lives in its output directory (per run)."""
    if not config.audiences and not config.triggers:
        return None
    for spec in profile_stores(config, output_dir):
        if spec.type in ("postgres", "redis", "sqlite"):
            return spec
    return None


def deliver(delivery) -> beam.PTransform:
    """The adapter of a destination's delivery (``files`` is written by write_outputs); each
    returns its dead letters (records it could not deliver after its retries)."""
    if delivery.type == "kafka":
        from transforms.io.kafka import DeliverToKafka

        return DeliverToKafka(delivery.kafka)
    if delivery.type == "webhook":
        from transforms.io.webhook import DeliverToWebhook

        return DeliverToWebhook(delivery.webhook)
    from transforms.io.pubsub import DeliverToPubSub

    return DeliverToPubSub(delivery.pubsub)


def write_outputs(
    outputs: dict,
    config: PipelineConfig,
    output_dir: str | Path,
    activate: bool = True,
    file_suffix: str = "",
) -> None:
    """The output directory contract (README). A record a sink cannot write (it does not encode,
    a row that is not a row) is a dead letter like any other: it lands in ``quarantine/`` as
    ``part-sink-*.ndjson`` (stage ``sink``); an unreachable sink fails the run. ``activate``:
    write the destinations (a replay suppresses them unless asked). ``file_suffix``: after
    each record file's prefix (``part<suffix>-00000-of-00001.ndjson``), so the passes of one
    run (pipelines/passes.py) write files of their own into the same directories."""
    paths = output_paths(config, output_dir)
    part = "part" + file_suffix
    # Once for every store: no store, and no dead-letter record of one, sees a row's raw
    # identifiers (they travel with it for activation only).
    rows = outputs[PROFILES] | "ProfileColumns" >> beam.Map(without_activation_fields)
    failed = [
        rows | f"WriteProfiles[{spec.type}:{i}]" >> WriteProfiles(spec)
        for i, spec in enumerate(profile_stores(config, output_dir))
    ]
    outputs[QUARANTINE] | "WriteQuarantine" >> WriteRecordsAsJson(
        str(paths[QUARANTINE]), lenient=True, prefix=part
    )
    for label, name, batched in (
        ("WriteDuplicates", DUPLICATES, False),
        ("WriteLate", LATE, False),
        ("WriteDenied", CONSENT_DENIED, True),
        ("WriteDeleted", DELETED, True),
        ("WriteMerges", MERGES, False),
        ("WriteIdentityReview", REVIEW, False),
    ):
        failed.append(
            outputs[name]
            | label >> WriteRecordsAsJson(str(paths[name]), batched=batched, prefix=part)
        )
    delivery_failed = []
    ledger = activation_ledger(config, output_dir)
    run = run_id()
    for name, records in outputs[DESTINATIONS].items() if activate else ():
        delivery = config.consent.destinations[name].delivery
        if ledger is not None and any(
            name in a.destinations for a in (*config.audiences, *config.triggers)
        ):
            records = records | f"SkipDelivered[{name}]" >> SkipDelivered(ledger, run)
        if delivery.type == "files":
            failed.append(
                records
                | f"Write[{name}]"
                >> WriteRecordsAsJson(str(paths[DESTINATIONS] / name), batched=True, prefix=part)
            )
        else:
            delivery_failed.append(records | f"Deliver[{name}]" >> deliver(delivery))
    if delivery_failed:
        (
            tuple(delivery_failed)
            | "MergeDeliveryDeadLetters" >> beam.Flatten()
            | "DeadLetters[delivery]" >> ElementDeadLetters("delivery", "record")
            | "WriteDeliveryDeadLetters"
            >> WriteRecordsAsJson(
                str(paths[QUARANTINE]), lenient=True, prefix=f"part-delivery{file_suffix}"
            )
        )
    (
        tuple(failed)
        | "MergeSinkDeadLetters" >> beam.Flatten()
        | "DeadLetters[sink]" >> ElementDeadLetters("sink", "record")
        | "WriteSinkDeadLetters"
        >> WriteRecordsAsJson(
            str(paths[QUARANTINE]), lenient=True, prefix=f"part-sink{file_suffix}"
        )
    )
