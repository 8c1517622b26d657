"""`/schema/openapi.json` describes the API as it answers.

First by reading the document (bodies, 2xx schemas, the error shape, OPTIONS on every path),
then with schemathesis against a real api process (granian, real PostgreSQL, Redis and S3) and
an admin key: every operation (examples, coverage and fuzzing phases, valid and invalid input),
then sequences that follow the document's links. No server error, no status code the document
does not list, no response that breaks its schema, content type or declared headers.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis import GenerationMode

from appliance.api.app import create_app
from appliance.api.openapi import complete
from appliance.attachments import jobs as attachment_jobs
from appliance.config import Config
from appliance.resources import open_resources
from tests.api_process import ROOT, ApiProcess, admin_key, api_settings

pytestmark = pytest.mark.process

# Bounds of the schemathesis run: about 20 operations, each with its coverage cases plus
# MAX_EXAMPLES generated ones; then STATEFUL_RUNS link-following sequences.
MAX_EXAMPLES = 25
STATEFUL_RUNS = 30
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "unsupported_method",
    "allow_header_conformance",
    "missing_required_header",
    "ignored_auth",
]
# Not `positive_data_acceptance`: some rules of valid input depend on state the document cannot
# state (a receipt's seq at most the head, reply_to an existing seq, expires_at in the future,
# [messages] limits of the configuration), so a schema-valid request may rightly be a 400.
HTTP_METHODS = {"get", "put", "post", "delete", "patch"}


@pytest.fixture(scope="module")
def running_api(
    base_settings: dict[str, Any], migrated: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ApiProcess, str]]:
    directory: Path = tmp_path_factory.mktemp("openapi")
    settings = api_settings(copy.deepcopy(base_settings), directory)
    asyncio.run(_init_storage(settings))  # else /readyz is rightly 503
    key = admin_key(settings)
    api = ApiProcess(directory, settings).start()
    try:
        yield api, key
    finally:
        api.stop()


async def _init_storage(settings: dict[str, Any]) -> None:
    async with open_resources(Config.model_validate(settings), "test") as res:
        await res.storage.init()


@pytest.fixture(scope="module")
def document(running_api: tuple[ApiProcess, str]) -> dict[str, Any]:
    api, _ = running_api
    response = httpx.get(f"{api.url}/schema/openapi.json", timeout=10)
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method, path, operation


def test_every_operation_declares_its_bodies_and_errors(document: dict[str, Any]) -> None:
    seen = 0
    for method, path, operation in operations(document):
        seen += 1
        where = f"{method.upper()} {path}"
        responses = operation["responses"]
        successes = [code for code in responses if code.startswith("2")]
        assert successes, where
        for code in successes:
            content = responses[code].get("content")
            if code == "204":
                assert content is None, where
                continue
            (media_type, body), *_ = content.items()
            if path == "/metrics":
                assert media_type == "text/plain", where
            else:
                assert media_type == "application/json", where
                assert body["schema"].get("type") == "object", (where, body)
                assert body["schema"]["properties"], where
        for code, response in responses.items():
            if code.startswith(("4", "5")) and path != "/readyz":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (where, code)
        if path.startswith("/v1/"):
            assert {"401", "403", "503"} <= set(responses), where
            assert operation["security"] == [{"bearer": []}], where
        if "{conversation}" in path or "{key_id}" in path:
            assert {"400", "404"} <= set(responses), where
        if method in {"post", "put", "patch"} and path.startswith("/v1/"):
            assert "requestBody" in operation, where
            assert {"400", "413"} <= set(responses), where
    assert seen >= 20
    error = document["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["code", "message", "field"]


def test_success_codes_are_the_ones_answered(document: dict[str, Any]) -> None:
    """Rotation and receipts answer 200 (they were declared 201); publish answers 201 or 200."""
    paths = document["paths"]
    assert set(paths["/v1/keys/{key_id}/rotate"]["post"]["responses"]) & {"200", "201"} == {"200"}
    receipts = paths["/v1/conversations/{conversation}/receipts"]["post"]["responses"]
    assert set(receipts) & {"200", "201"} == {"200"}
    publish = paths["/v1/conversations/{conversation}/messages"]["post"]["responses"]
    assert {"200", "201"} <= set(publish)
    assert "429" in publish
    assert publish["429"]["headers"]["Retry-After"]["required"] is True


def _concrete(path: str) -> str:
    values = {"conversation": "c-1", "member": "user:x", "key_id": "a" * 12, "seq": "1",
              "webhook": "wh_" + "a" * 12}  # fmt: skip
    values["attachment"] = "0" * 26  # a ULID
    values["export"] = "0" * 26  # a ULID
    return re.sub(r"\{(\w+)\}", lambda m: values[m[1]], path)


def test_options_lists_every_method_of_every_path(
    running_api: tuple[ApiProcess, str], document: dict[str, Any]
) -> None:
    api, _ = running_api
    for path, item in document["paths"].items():
        declared = {m.upper() for m in item if m in HTTP_METHODS} | {"OPTIONS"}
        response = httpx.options(f"{api.url}{_concrete(path)}", timeout=10)
        assert response.status_code == 204, path
        allowed = {m.strip() for m in response.headers["allow"].split(",")}
        assert allowed == declared, path
    conversation = httpx.options(f"{api.url}/v1/conversations/x", timeout=10)
    assert conversation.headers["allow"] == "DELETE, GET, OPTIONS, PATCH"


def test_links_name_operations_that_exist(document: dict[str, Any]) -> None:
    ids = {operation["operationId"] for _, _, operation in operations(document)}
    links = [
        link
        for _, _, operation in operations(document)
        for response in operation["responses"].values()
        for link in response.get("links", {}).values()
    ]
    assert links
    assert {link["operationId"] for link in links} <= ids


def _document() -> dict[str, Any]:
    """The document as the app builds it (the served one is checked to be the same)."""
    settings = tomllib.loads((ROOT / "config.example.toml").read_text())
    return complete(create_app(Config.model_validate(settings)).openapi_schema.to_schema())


def test_served_document_is_the_one_tested(document: dict[str, Any]) -> None:
    assert document == json.loads(json.dumps(DOCUMENT))


# Loaded when the module is: schemathesis makes one test per operation at collection. (Its lazy
# loader, `from_fixture`, fails on pytest 9: it reads `Function._nodeid`.)
DOCUMENT = _document()


def _without_impersonation(document: dict[str, Any]) -> dict[str, Any]:
    """The document less X-On-Behalf-Of: the admin key cannot impersonate, so a generated one
    makes any request a 403 (tests/test_auth_matrix.py covers impersonation)."""
    tested = copy.deepcopy(document)
    for _, _, operation in operations(tested):
        operation["parameters"] = [
            p for p in operation.get("parameters", []) if p["name"] != "X-On-Behalf-Of"
        ]
    return tested


SCHEMA = schemathesis.openapi.from_dict(_without_impersonation(DOCUMENT))
SCHEMA.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES
)
SCHEMA.config.checks.update(included_check_names=CHECKS)
# Sequences follow the document's own links only: a link inferred from `GET /v1/keys` to
# `DELETE /v1/keys/{key_id}` would revoke the key the run authenticates with.
SCHEMA.config.phases.stateful.inference.algorithms = []
_CONVERSATION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ATTACHMENT_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_KEY_ID = re.compile(r"^[a-z0-9]{12}$")
_WEBHOOK_ID = re.compile(r"^wh_[a-z0-9]{12}$")
_URL_LENGTH = re.compile(r"^[^\x00]{1,2048}$", re.DOTALL)


@SCHEMA.hook
def map_body(context: Any, body: Any) -> Any:
    """A fresh id for each conversation and key created: the ids are the client's, so a replayed
    sequence would otherwise meet its own earlier creations (409) and hypothesis would see the
    same choices lead elsewhere. Invalid ids (negative cases) are left as drawn."""
    if not isinstance(body, dict):
        return body
    path = context.operation.path
    fresh = uuid.uuid4().hex
    if path == "/v1/conversations" and _valid(body.get("conversation"), _CONVERSATION_ID):
        body["conversation"] = f"st-{fresh}"
    if path == "/v1/keys" and _valid(body.get("name"), _KEY_NAME):
        body["name"] = f"st-{fresh}"
    # A receiver URL the running api accepts (public, well-formed); other strings are refused
    # by rules the document cannot state (the address's kind, user info).
    if path.startswith("/v1/webhooks") and _valid(body.get("url"), _URL_LENGTH):
        body["url"] = f"https://hooks.example.com/{fresh}"
    return body


def _valid(value: Any, pattern: re.Pattern[str]) -> bool:
    return isinstance(value, str) and pattern.match(value) is not None


# While set, valid conversation ids in paths are replaced by this existing one (it has members
# and messages), and valid attachment ids by a verified attachment of it, so that the
# per-operation runs reach the handlers instead of 404 alone.
SEEDED: dict[str, str] = {}


@SCHEMA.hook
def map_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    if path_parameters is None:
        return path_parameters
    mapped = dict(path_parameters)
    seeded = SEEDED.get("conversation")
    operation = context.operation
    if (
        seeded is not None
        and (operation.method.upper(), operation.path)
        != ("DELETE", "/v1/conversations/{conversation}")
        and _valid(path_parameters.get("conversation"), _CONVERSATION_ID)
    ):
        mapped["conversation"] = seeded
    attachment = SEEDED.get("attachment")
    if attachment is not None and _valid(path_parameters.get("attachment"), _ATTACHMENT_ID):
        mapped["attachment"] = attachment
    export = SEEDED.get("export")
    if export is not None and _valid(path_parameters.get("export"), _ATTACHMENT_ID):
        mapped["export"] = export  # export ids are ULIDs too
    # A key of its own for rotation and one for revocation (revoking is idempotent; rotating a
    # revoked key is a 404): reached without depending on the stateful runs' links alone.
    key = SEEDED.get("key_revoke" if operation.method.upper() == "DELETE" else "key_rotate")
    if key is not None and _valid(path_parameters.get("key_id"), _KEY_ID):
        mapped["key_id"] = key
    webhook = SEEDED.get("webhook")
    if (
        webhook is not None
        and (operation.method.upper(), operation.path) != ("DELETE", "/v1/webhooks/{webhook}")
        and _valid(path_parameters.get("webhook"), _WEBHOOK_ID)
    ):
        mapped["webhook"] = webhook
    return mapped


async def _verified_attachment(url: str, headers: dict[str, str], conversation: str) -> str:
    """An attachment of `conversation`, uploaded with its presigned form and completed."""
    async with httpx.AsyncClient(timeout=10) as http:
        created = await http.post(
            f"{url}/v1/conversations/{conversation}/attachments",
            json={"filename": "a.txt", "content_type": "text/plain", "size": 2},
            headers=headers,
        )
        assert created.status_code == 201, created.text
        form = created.json()["upload"]
        uploaded = await http.post(form["url"], data=form["fields"], files={"file": b"hi"})
        assert uploaded.status_code == 204, uploaded.text
        attachment: str = created.json()["id"]
        completed = await http.post(f"{url}/v1/attachments/{attachment}/complete", headers=headers)
        assert completed.status_code == 202, completed.text
    return attachment


async def _verify(settings: dict[str, Any], attachment: str) -> None:
    """The verification job's handler, run here: this test runs no worker."""
    async with open_resources(Config.model_validate(settings), "test") as res:
        await attachment_jobs.verify(res, attachment_jobs.payload(attachment))


@pytest.fixture(scope="module")
def target(running_api: tuple[ApiProcess, str]) -> tuple[str, dict[str, str]]:
    """The base URL and the admin key's header."""
    api, key = running_api
    SCHEMA.config.update(base_url=api.url)
    headers = {"Authorization": f"Bearer {key}"}
    conversation = f"st-seeded-{uuid.uuid4().hex}"
    members = [{"principal": "user:st-member", "role": "member"}]
    created = httpx.post(
        f"{api.url}/v1/conversations",
        json={"conversation": conversation, "members": members},
        headers=headers,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    for n in range(3):
        published = httpx.post(
            f"{api.url}/v1/conversations/{conversation}/messages",
            json={"type": "text", "body": {"n": n}},
            headers=headers,
            timeout=10,
        )
        assert published.status_code == 201, published.text
    attachment = asyncio.run(_verified_attachment(api.url, headers, conversation))
    asyncio.run(_verify(api.settings, attachment))
    SEEDED["conversation"], SEEDED["attachment"] = conversation, attachment
    exported = httpx.post(
        f"{api.url}/v1/conversations/{conversation}/exports", headers=headers, timeout=10
    )
    assert exported.status_code == 202, exported.text
    SEEDED["export"] = exported.json()["id"]
    hook = httpx.post(
        f"{api.url}/v1/webhooks",
        json={"url": "https://hooks.example.com/seeded", "events": ["export.ready"]},
        headers=headers,
        timeout=10,
    )
    assert hook.status_code == 201, hook.text
    SEEDED["webhook"] = hook.json()["id"]
    for use in ("key_rotate", "key_revoke"):
        key = httpx.post(
            f"{api.url}/v1/keys",
            json={"name": f"st-{use}-{uuid.uuid4().hex}", "scopes": []},
            headers=headers,
            timeout=10,
        )
        assert key.status_code == 201, key.text
        SEEDED[use] = key.json()["id"]
    return api.url, headers


SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking: bounded time
)


@SCHEMA.exclude(path="/v1/stream").parametrize()
@SETTINGS
def test_every_operation_conforms(case: Any, target: tuple[str, dict[str, str]]) -> None:
    base_url, headers = target
    case.call_and_validate(base_url=base_url, headers=headers)


def test_linked_sequences_conform(target: tuple[str, dict[str, str]]) -> None:
    _, headers = target
    SEEDED.clear()  # sequences use the conversations they create

    class Sequences(SCHEMA.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": headers}

    Sequences.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_RUNS,
            stateful_step_count=6,
            deadline=None,
            database=None,  # not derandomized: the server's state differs between runs
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.generate],
        )
    )


def test_the_runs_reached_every_operation(
    running_api: tuple[ApiProcess, str], document: dict[str, Any]
) -> None:
    """The runs above were not all refusals: each operation answered a success at least once."""
    api, _ = running_api
    answers: Counter[tuple[str, str, int]] = Counter()
    for line in api.log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "request":
            answers[entry["method"], entry["route"], entry["status"]] += 1
    succeeded = {(method, route) for method, route, status in answers if 200 <= status < 300}
    expected = {
        (method.upper(), path)
        for method, path, _ in operations(document)
        if path not in {"/livez", "/readyz", "/metrics"}  # probes are not logged
    }
    # Receipts are members' own: the admin key is none (tests/test_stream.py posts them).
    expected.discard(("POST", "/v1/conversations/{conversation}/receipts"))
    missing = expected - succeeded
    assert not missing, sorted(a for a in answers.items() if a[0][:2] in missing)
