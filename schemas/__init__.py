"""The record contract shared by the engine, ChatRex training/eval and users (see docs/record.md)."""

from schemas.record import (
    INDEX_SCHEMA,
    REJECTS_SCHEMA,
    SCHEMA_VERSION,
    Caption,
    ConversationTurn,
    Dropped,
    GroundedCaption,
    GroundedSpan,
    Phrase,
    Record,
    Region,
    SchemaError,
    Source,
    check_version,
    to_index_row,
    validate,
)

__all__ = [
    "INDEX_SCHEMA",
    "REJECTS_SCHEMA",
    "SCHEMA_VERSION",
    "Caption",
    "ConversationTurn",
    "Dropped",
    "GroundedCaption",
    "GroundedSpan",
    "Phrase",
    "Record",
    "Region",
    "SchemaError",
    "Source",
    "check_version",
    "to_index_row",
    "validate",
]
