"""Structured output: on the tiny random model (whose free text is noise), the grammar
alone must make every answer parse and validate, on base and adapter rows of one batch.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from adapterd.config import CacheConfig, HttpConfig
from adapterd.metrics import Metrics
from adapterd_api.v1 import inference_pb2 as pb
from prometheus_client import CollectorRegistry

from tests.http.conftest import MAX_RANK, registry_resolver
from tests.http_harness import OpenAIServer

S = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["c"]}}, "required": ["b"]}},
     "required": ["a"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["x"]},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1000, "maximum": 9999},
                                      "label": S}, "required": ["id", "label"]},
    {"type": "object", "properties": {"status": {"const": "done"}}, "required": ["status"]},
    {"type": "object", "properties": {"point": {"type": "array", "prefixItems": [
        {"type": "integer", "minimum": 0, "maximum": 99}, {"type": "integer", "minimum": 0, "maximum": 99}],
        "items": False, "minItems": 2}}, "required": ["point"]},
    {"type": "object", "properties": {"maybe": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0,
                                                                               "maximum": 3}]}},
     "required": ["maybe"]},
    {"type": "object", "properties": {"people": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"n": S, "k": {"enum": ["a", "b"]}}, "required": ["n", "k"]}}},
     "required": ["people"]},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"score": {"type": "integer", "minimum": 10, "maximum": 20},
                                      "grade": {"enum": ["A", "B", "C"]}, "pass": {"type": "boolean"}},
     "required": ["score", "grade", "pass"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"opt": S, "req": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["req"]},
    {"$defs": {"leaf": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["v"]}},
     "type": "object", "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
     "required": ["left", "right"]},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"]},
]
assert len(SCHEMAS) == 20


@pytest.fixture(scope="module")
def server(parts_for, registry_store):
    parts = parts_for(4)
    resolver = registry_resolver(registry_store, parts.spec)
    s = OpenAIServer.start(parts, resolver, registry=resolver.registry, metrics=Metrics(CollectorRegistry()),
                           cache=CacheConfig(gpu_slots=4, max_rank=MAX_RANK), http=HttpConfig(port=0))
    yield s
    s.stop()


def test_twenty_schemas_validate_on_base_and_adapter_rows_in_one_batch(server):
    client = server.openai()

    def ask(i: int):
        schema = SCHEMAS[i % len(SCHEMAS)]
        model = "" if i % 2 == 0 else f"a{i % 4}"
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"answer {i}"}], max_tokens=160, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        return schema, out.choices[0]

    with ThreadPoolExecutor(8) as pool:  # 40 requests: each schema on a base row and an adapter row
        results = list(pool.map(ask, range(2 * len(SCHEMAS))))
    for schema, choice in results:
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_gives_an_object(server):
    out = server.openai().completions.create(model="a1", prompt="{", max_tokens=200, temperature=0,
                                             extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(out.choices[0].text), dict)


def test_an_uncompilable_schema_is_a_400_naming_the_problem(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.openai().chat.completions.create(
            model="", messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {
                "type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}}}})
    assert e.value.body["param"] == "response_format"
    assert "minimum greater than maximum" in e.value.body["message"]


def test_grpc_response_format(server):
    schema = SCHEMAS[15]
    out = server.inference.Generate(pb.GenerateRequest(prompt="grade it", adapter="a2", params=pb.GenerationParams(
        max_new_tokens=100, response_format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA,
                                                              json_schema=json.dumps(schema)))))
    assert out.finish_reason == pb.EOS
    jsonschema.validate(json.loads(out.text), schema)
    import grpc

    with pytest.raises(grpc.RpcError) as e:
        server.inference.Generate(pb.GenerateRequest(prompt="x", params=pb.GenerationParams(
            max_new_tokens=4, response_format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA,
                                                                json_schema='{"type": "nope"}'))))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in e.value.details()
