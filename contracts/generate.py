"""Generate the committed AsyncAPI document and JSON Schemas from the models.

`crm contracts generate` writes them; `crm contracts check` (and a test)
fails when the committed copies drift from the code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Union

from pydantic import Field, RootModel

from contracts import EVENTS_BY_TOPIC, topics

HERE = Path(__file__).parent
ASYNCAPI_PATH = HERE / "asyncapi.json"
SCHEMA_DIR = HERE / "schemas"

# Who consumes what, for the document. The services read what their `CONSUMES` says; a unit test
# (tests/unit/test_wiring.py) checks that this table agrees.
CONSUMERS = {
    topics.SHOP_PURCHASES: ["profile", "loyalty", "churn"],
    topics.SHOP_INTERACTIONS: ["profile", "loyalty", "churn"],
    topics.CRM_PROFILE: ["notify", "churn"],
    topics.CRM_SEGMENTS: [],
    topics.CRM_CARE: ["notify"],
    topics.CRM_RETENTION: ["notify"],
    topics.CRM_LOYALTY: [],
    topics.CRM_TIERS: ["churn"],
    topics.CRM_REFERRALS: ["loyalty"],
    topics.CRM_CHURN: [],
    topics.CRM_NOTIFICATIONS: [],
}


# Topics that also carry unkeyed watermark records under event time (contracts/watermark.py).
WATERMARKED = {topics.SHOP_PURCHASES, topics.SHOP_INTERACTIONS}
WATERMARKS = (
    " In replays also unkeyed watermark records (header crm-watermark, a JSON value of"
    " contracts/watermark.py, not an event): readers skip them."
)


def _topic_message(topic: str) -> type[RootModel]:
    models = EVENTS_BY_TOPIC[topic]
    union = models[0] if len(models) == 1 else Annotated[Union[tuple(models)], Field(discriminator="type")]  # noqa: UP007
    name = "".join(part.capitalize() for part in topic.replace(".", "_").split("_")) + "Message"
    return type(name, (RootModel[union],), {"__doc__": f"Any event on `{topic}`."})


def asyncapi_document() -> dict:
    from faststream.kafka import KafkaBroker
    from faststream.specification import AsyncAPI

    broker = KafkaBroker("kafka:9092", description="Customer-relationship event backbone")
    for topic in topics.ALL:
        message = _topic_message(topic)
        types = ", ".join(m.__name__ for m in EVENTS_BY_TOPIC[topic])
        broker.publisher(
            topic,
            schema=message,
            title=topic,
            description=f"Key: customer_id. Events: {types}. Dead letters go to {topics.dlq(topic)}."
            + (WATERMARKS if topic in WATERMARKED else ""),
        )
    spec = AsyncAPI(
        broker,
        title="CRM event backbone",
        version="1.0.0",
        schema_version="3.0.0",
        description="Topics, envelopes and payloads. Generated from contracts/ by `crm contracts generate`.",
    )
    return json.loads(spec.to_specification().to_json())


def json_schemas() -> dict[str, dict]:
    out = {}
    for models in EVENTS_BY_TOPIC.values():
        for m in models:
            version = m.model_fields["schema_version"].default
            schema = m.model_json_schema(mode="validation")
            schema["$id"] = f"urn:crm:event:{m.__name__}:v{version}"
            schema["x-topic"] = m.TOPIC
            out[f"{m.__name__}.v{version}.json"] = schema
    return out


def _dump(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def rendered() -> dict[Path, str]:
    files = {ASYNCAPI_PATH: _dump(asyncapi_document())}
    for name, schema in json_schemas().items():
        files[SCHEMA_DIR / name] = _dump(schema)
    return files


def generate() -> list[Path]:
    SCHEMA_DIR.mkdir(exist_ok=True)
    files = rendered()
    for stale in set(SCHEMA_DIR.glob("*.json")) - set(files):
        stale.unlink()
    for path, text in files.items():
        path.write_text(text)
    return sorted(files)


def drift() -> list[str]:
    """Paths whose committed content differs from what the models generate."""
    files = rendered()
    problems = [str(p.relative_to(HERE.parent)) for p, text in files.items() if not p.exists() or p.read_text() != text]
    problems += [
        f"{p.relative_to(HERE.parent)} (no longer generated)" for p in set(SCHEMA_DIR.glob("*.json")) - set(files)
    ]
    return sorted(problems)
