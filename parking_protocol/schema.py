"""Print the JSON Schema of every wire message: ``python -m parking_protocol.schema``.

``docs/protocol.schema.json`` is this output; a test keeps it current.
"""

from __future__ import annotations

import json
import sys

from parking_protocol.messages import message_json_schema


def render() -> str:
    return json.dumps(message_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
