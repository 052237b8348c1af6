"""The main job: governed events in, unified profiles and typed side outputs out.

    sources -> ValidateEvents -> DeduplicateEvents -+-> BuildProfiles ---------> profile sink
                   |                  |   |         |         ^
                   quarantine <-------+   duplicates +-> ComputeTraits (windowed panes)
                                                               |
                                                               late

``build(p, config, inputs)`` wires the graph and returns its outputs by name, so tests drive it
without a CLI; ``write_outputs`` attaches the sinks of the output-directory contract (README).
Step labels are fixed: they and the state names are part of the streaming update contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apache_beam as beam

from pipelines.config import PipelineConfig, parse_instant
from runners.sources import ReadFileSource
from transforms.computed_traits import LATE, ComputedTraitSpec, ComputeTraits
from transforms.dedup import DeduplicateEvents
from transforms.identity import primary_profile_key
from transforms.profile import BuildProfiles, TraitRules
from transforms.quarantine import DUPLICATES, QUARANTINE
from transforms.sinks import WriteProfilesToSqlite, WriteRecordsAsJson
from transforms.tracking_plan import load_plan
from transforms.validate import ValidateEvents

# Output names: the keys of build()'s result and the directories of the output contract.
VALID, PROFILES = "valid", "profiles"
OUTPUTS = (VALID, QUARANTINE, DUPLICATES, LATE, PROFILES)


def source_inputs(config: PipelineConfig, override: list[str] | None = None) -> dict[str, list[str]]:
    """Input globs per source: ``--input`` replaces the first source's paths."""
    out = {s.name: [str(config.resolve(p)) for p in s.paths] for s in config.sources}
    if override:
        out[config.sources[0].name] = list(override)
    return out


def build(p: beam.Pipeline, config: PipelineConfig, inputs: dict[str, list[str]]) -> dict:
    """Wire the governed path; returns ``{name: PCollection}`` for the names in :data:`OUTPUTS`."""
    plans = {name: load_plan(config.resolve(ref.path)) for name, ref in config.tracking_plans.items()}
    reads = []
    for src in config.sources:
        reads.append(p | f"Read[{src.name}]" >> ReadFileSource(src.name, src.format, inputs[src.name]))
    raw = reads[0] if len(reads) == 1 else tuple(reads) | "MergeSources" >> beam.Flatten()

    validated = raw | "ValidateEvents" >> _validate(config, plans)
    deduped = validated.valid | "DeduplicateEvents" >> DeduplicateEvents(
        config.dedup.key, config.dedup.ttl
    )
    unique = deduped.unique
    identity = config.identity
    fragments = {"events": unique}
    late = None
    if config.computed_traits:
        traits = (
            unique
            | "KeyByProfile"
            >> beam.Map(lambda env: (primary_profile_key(env.event, identity), env)).with_output_types(
                beam.typehints.KV[str, Any]
            )
            | "ComputeTraits"
            >> ComputeTraits(
                [ComputedTraitSpec.from_config(c) for c in config.computed_traits],
                int(config.windows.allowed_lateness * 1000),
            )
        )
        fragments["computed"] = traits.computed
        late = traits[LATE]
    rules = TraitRules(frozenset(config.profile.set_once), frozenset(config.profile.increment))
    profiles = fragments | "BuildProfiles" >> BuildProfiles(
        identity, rules, config.profile.update_every
    )
    if late is None:
        late = p | "NoLateEvents" >> beam.Create([])
    quarantine = (
        validated[QUARANTINE],
        deduped[QUARANTINE],
    ) | "MergeQuarantine" >> beam.Flatten()
    return {
        VALID: unique,
        QUARANTINE: quarantine,
        DUPLICATES: deduped[DUPLICATES],
        LATE: late,
        PROFILES: profiles,
    }


def _validate(config: PipelineConfig, plans):
    return ValidateEvents(
        {s.name: plans[s.tracking_plan] for s in config.sources},
        config.identity,
        max_event_bytes=config.validation.max_event_bytes,
        max_depth=config.validation.max_depth,
        max_future_skew_ms=int(config.event_time.max_future_skew * 1000),
        floor_ms=int(parse_instant(config.event_time.min_event_time) * 1000),
        clamp_event_time=config.event_time.on_invalid == "clamp",
    )


def output_paths(config: PipelineConfig, output_dir: str | Path) -> dict[str, Path]:
    out = Path(output_dir)
    return {
        PROFILES: out / config.sinks.profiles.path,
        QUARANTINE: out / "quarantine",
        DUPLICATES: out / "duplicates",
        LATE: out / "late",
        "report": out / "run_report.json",
    }


def write_outputs(outputs: dict, config: PipelineConfig, output_dir: str | Path) -> None:
    paths = output_paths(config, output_dir)
    outputs[PROFILES] | "WriteProfiles" >> WriteProfilesToSqlite(str(paths[PROFILES]))
    outputs[QUARANTINE] | "WriteQuarantine" >> WriteRecordsAsJson(str(paths[QUARANTINE]))
    outputs[DUPLICATES] | "WriteDuplicates" >> WriteRecordsAsJson(str(paths[DUPLICATES]))
    outputs[LATE] | "WriteLate" >> WriteRecordsAsJson(str(paths[LATE]))
