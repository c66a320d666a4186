"""The published JSON Schemas: the manifest users write, and the per-VM report.

`vmcraft-tasks schema manifest|report` prints them; docs/schemas/ holds the same text
(a unit test keeps the two equal).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from vmcraft_tasks.models.manifest import Manifest
from vmcraft_tasks.models.report import VMReport

SCHEMAS: dict[str, type[BaseModel]] = {"manifest": Manifest, "report": VMReport}
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of a published document (`manifest` or `report`)."""
    return {"$schema": DIALECT, **SCHEMAS[name].model_json_schema()}


def schema_text(name: str) -> str:
    """`json_schema(name)` as the text published in docs/schemas/."""
    return json.dumps(json_schema(name), indent=2, ensure_ascii=False) + "\n"
