from __future__ import annotations

from pathlib import Path

from parking_protocol.schema import render

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_published_json_schema_matches_the_models() -> None:
    published = (DOCS / "protocol.schema.json").read_text()
    assert published == render(), (
        "docs/protocol.schema.json is stale: "
        "run `python -m parking_protocol.schema > docs/protocol.schema.json`"
    )


def test_protocol_doc_names_every_topic_kind_and_message() -> None:
    text = (DOCS / "protocol.md").read_text()
    for word in (
        "events",
        "commands",
        "replies",
        "status",
        "denylist",
        "ScanEvent",
        "GateCommand",
        "EventAck",
        "CommandReply",
        "GatewayStatus",
        "DenyList",
        "QP1",
        "TCP_NODELAY",
        "deadline",
    ):
        assert word in text
