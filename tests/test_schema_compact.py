"""Output schemas are published compacted (server.mcp_app.compact_schema): they must accept
and refuse exactly what the pydantic-derived originals do."""

from __future__ import annotations

import copy
import json

import pytest
from jsonschema.validators import validator_for
from pydantic import TypeAdapter
from referencing import Registry

from server.mcp_app import compact_schema, load_tools
from tools import files as F


def _ok(schema, doc) -> bool:
    v = validator_for(schema)(schema, registry=Registry())
    return not list(v.iter_errors(doc))


GOOD = {"path": "/d", "next_cursor": None, "entries": [
    {"name": "a.txt", "path": "/d/a.txt", "kind": "file", "size": 1, "version": 1,
     "modified": "2026-01-01T00:00:00Z", "labels": ["EMAIL_ADDRESS"]},
    {"name": "sub", "path": "/d/sub", "kind": "directory", "size": 0, "version": 1,
     "modified": None}]}


def _variants():
    yield GOOD, True
    for mutate in (
        lambda d: d["entries"][0].__setitem__("kind", "socket"),
        lambda d: d["entries"][0].__setitem__("kind", 5),
        lambda d: d["entries"][0].__setitem__("kind", None),
        lambda d: d["entries"][0].__setitem__("modified", 5),
        lambda d: d["entries"][1].pop("name"),
        lambda d: d["entries"][0].__setitem__("labels", "EMAIL"),
        lambda d: d.__setitem__("next_cursor", 3),
        lambda d: d.pop("entries"),
        lambda d: d["entries"][0].__setitem__("size", "1"),
    ):
        bad = copy.deepcopy(GOOD)
        mutate(bad)
        yield bad, False


@pytest.mark.parametrize("doc, valid", list(_variants()))
def test_compact_schema_judges_like_the_original(doc, valid):
    original = TypeAdapter(F.ListDirectoryResult).json_schema()
    compact = compact_schema(original)
    assert _ok(original, doc) is valid
    assert _ok(compact, doc) is valid


def test_every_published_output_schema_is_compact():
    from mcp.server.mcpserver.tools import Tool

    from server.mcp_app import _schema_stub

    for spec in load_tools():
        tool = Tool.from_function(_schema_stub(spec), name=spec.name)
        schema = tool.fn_metadata.output_schema
        if schema is None:
            continue
        text = json.dumps(compact_schema(schema))
        assert "$ref" not in text and "$defs" not in text, spec.name
        validator_for(schema).check_schema(compact_schema(schema))
