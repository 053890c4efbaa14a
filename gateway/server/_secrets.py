"""Dataset secrets in a job's spec: in the gateway's memory only, never on its disk.

Over an encrypted connection a job's ``--data`` storage options may hold a secret (an access
key, a token). The gateway keeps the job's spec as it came in memory (the registry's record,
from which assignments are built) and stores a copy with every secret value replaced by
``"***"`` (``for_disk``) and marked (``meta[SECRETS_META] = "memory"``). So SQLite, the replay
of a job to a re-attaching client and the logs never hold a secret in clear (``DataRef`` hides
its options from ``repr``).

The cost, by design: a gateway that restarts has lost the secrets. A resumed job whose stored
spec is marked (``lost_secrets``) fails at once with ``LOST_SECRETS``, which says what to do.
"""

from __future__ import annotations

import dataclasses

from gateway.protocol import JobSpec, redact

__all__ = ["LOST_SECRETS", "SECRETS_META", "for_disk", "has_secrets", "lost_secrets"]

SECRETS_META = "pilot.secrets"
LOST_SECRETS = (
    "This job's dataset credentials (--data storage options holding a secret) were kept in the "
    "gateway's memory only, never on its disk, and the gateway restarted: its remaining tasks "
    "cannot read their data. Submit the job again."
)


def has_secrets(spec: JobSpec) -> bool:
    """Whether any dataset of ``spec`` carries a secret in its storage options."""
    return spec.data is not None and any(ref.has_secrets for ref in spec.data.refs)


def for_disk(spec: JobSpec) -> JobSpec:
    """``spec`` itself when it holds no secret, else a copy with every secret redacted and
    the mark that says so."""
    if spec.data is None or not has_secrets(spec):
        return spec
    refs = tuple(
        dataclasses.replace(r, storage_options=redact(r.storage_options)) if r.has_secrets else r
        for r in spec.data.refs
    )
    return dataclasses.replace(
        spec,
        data=dataclasses.replace(spec.data, refs=refs),
        meta={**spec.meta, SECRETS_META: "memory"},
    )


def lost_secrets(spec: JobSpec) -> bool:
    """Whether ``spec`` was stored without its secrets (see ``for_disk``)."""
    return spec.meta.get(SECRETS_META) == "memory"
