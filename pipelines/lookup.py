"""Profile lookup by any identifier, for programs, `cdi profile get` and `cdi serve`.

An identifier is written as people have it (``email:Jane@Example.com``, ``anon:a1``,
``user_id:u1``, or a profile id); :func:`lookup_key` turns it into the key the store holds: the
identity type's normalizer, then the profile store's PII policy (an email the policy hashes is
looked up by its hash, so a caller never needs the salt and the store never holds the raw
value). Reads go through the store's reader (:mod:`transforms.profile_store`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pipelines.config import PipelineConfig
from transforms.identity import PREFIX, id_key, normalize
from transforms.profile_store import StoreSpec, open_reader, spec_from_url

_TYPE_OF_PREFIX = {v: k for k, v in PREFIX.items()}


class KeyMaker:
    """``text -> store key`` for one config (the redactor is built once)."""

    def __init__(self, config: PipelineConfig):
        from pipelines.governed_profiles import (
            identifier_redactor,
            pii_policies,
            pii_rules,
            pii_salt,
        )

        self._types = {t.name: t for t in config.identity.types}
        policy, default = pii_policies(config)["profiles"]
        self._redact = identifier_redactor(
            config, pii_rules(config), policy, default, pii_salt(config)
        )

    def __call__(self, text: str) -> str:
        if ":" not in text:
            return text  # a profile id
        prefix, value = text.split(":", 1)
        id_type = _TYPE_OF_PREFIX.get(prefix, prefix)
        spec = self._types.get(id_type)
        if spec is None:
            return text  # not an identity type of this config: a profile id such as "user:u1"
        value = normalize(value, spec.normalizer) or value
        return self._redact(id_key(id_type, value)) or id_key(id_type, value)


def lookup_key(text: str, config: PipelineConfig) -> str:
    return KeyMaker(config)(text)


def profile_view(profile: dict[str, Any]) -> dict[str, Any]:
    """What a lookup returns: the stored profile (already under the store's PII policy)."""
    return profile


async def get_profile_async(reader, key: str) -> dict[str, Any] | None:
    found = await reader.get(key)
    return profile_view(found) if found is not None else None


def get_profile(
    identifier: str, sink: str | StoreSpec, config: PipelineConfig | None = None
) -> dict[str, Any] | None:
    """The profile ``identifier`` names in the store ``sink`` (a URL, a SQLite path or a
    :class:`StoreSpec`), or ``None``. ``config``: whose identity types and PII policy the store
    was written with (default: the embedded default config)."""
    from pipelines.config import load_default_config

    spec = sink if isinstance(sink, StoreSpec) else spec_from_url(sink)
    key = lookup_key(identifier, config or load_default_config())

    async def go():
        reader = open_reader(spec, pool_size=1)
        try:
            return await get_profile_async(reader, key)
        finally:
            await reader.aclose()

    return asyncio.run(go())
