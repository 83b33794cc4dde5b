"""How request parsing treats fields it does not know, or knows but cannot honour.

vLLM's server accepts and ignores unknown fields (its OpenAIBaseModel allows extras and logs them), so clients
written for it add fields for other servers freely; raytp's request models do the same through ``LenientModel``:
unknown keys, at any depth, are dropped before validation and their names (never their values, which may be
prompt text) logged once per process at INFO. Fields raytp knows but cannot honour are declared on the models
and refused with ``refuse_if_set`` once they ask for anything, so they are never ignored by accident.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

logger = logging.getLogger("ray.serve")
_MAX_LOGGED_FIELDS = 256  # bounds the memory (and the log) a client inventing field names can take
_logged_fields: set[str] = set()
_known: dict[type, frozenset[str]] = {}


class LenientModel(BaseModel):
    """A request object: unknown keys accepted and dropped (``extra="ignore"``), their names logged once.
    ``_where`` names the object in that log line (``request``, ``messages``, ...)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    _where: ClassVar[str] = "request"

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data):
        if isinstance(data, dict):
            known = _known_keys(cls)
            for key in data:
                if isinstance(key, str) and key not in known:
                    _note_ignored(cls._where, key)
        return data


def refuse_if_set(value, why: str):
    """For a field validator: refuse a field raytp knows but cannot honour once it asks for something (None,
    false and empty values pass: they ask for nothing)."""
    if value not in (None, False, [], {}):
        raise ValueError(f"not supported: {why}")
    return value


def _known_keys(cls) -> frozenset[str]:
    keys = _known.get(cls)
    if keys is None:
        keys = _known[cls] = frozenset(n for name, f in cls.model_fields.items() for n in (name, f.alias) if n)
    return keys


def _note_ignored(where: str, key: str) -> None:
    name = f"{where}.{key[:64]}"
    if name in _logged_fields or len(_logged_fields) >= _MAX_LOGGED_FIELDS:
        return
    _logged_fields.add(name)
    logger.info("raytp: ignoring unknown request field %r (accepted as vLLM does; logged once per process)", name)
