"""Bounded schemathesis run against the API's own OpenAPI schema: no input makes it answer 5xx.

The app is the real one (``api.app:create_app``) over a small real index (the ``small_home``
fixture), with its lifespan running. Every operation of the schema gets ``EXAMPLES`` seeded,
derandomized cases (schemathesis' own pytest plugin is not used: its fixture loader does not
run on pytest 9, so the operations are driven through ``APIOperation.as_strategy``).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

EXAMPLES = 12  # per operation


@pytest.fixture(scope="module")
def api(small_home, towers, tmp_path_factory):
    from api.app import create_app
    from api.settings import ApiSettings

    tmp = tmp_path_factory.mktemp("fuzz")
    settings_ = ApiSettings(home=small_home, device="cpu", watch_seconds=0, rate_per_minute=0,
                            keys_file=tmp / "keys.json", audit_log=tmp / "audit.log")  # fmt: skip
    app = create_app(settings_, encoder=towers)
    with TestClient(app):  # runs the lifespan once: catalog, model and indexes loaded for every call
        yield app


def test_no_input_gives_a_server_error(api):
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]
    failures: list[str] = []
    calls: dict[str, int] = {}

    def fuzz(op):
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def run(case):
            response = case.call()
            calls[op.label] = calls.get(op.label, 0) + 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                f"{response.text[:300]}\n  {case.as_curl_command()}")  # fmt: skip
            elif response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
                if "error" not in response.json():
                    failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}, no error body")

        run()

    for op in operations:
        fuzz(op)
    print(f"schemathesis: {len(operations)} operations, {sum(calls.values())} calls, {len(failures)} failures")
    assert not failures, "\n".join(failures[:10])
    assert sum(calls.values()) >= len(operations)  # every operation was called at least once
