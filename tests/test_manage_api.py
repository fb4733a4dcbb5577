"""The management, billing and cost-analysis API, driven over HTTP as a tool would."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx2
import pytest
from starlette.applications import Starlette

from gate_middleware import Gateway
from gate_middleware.demo import create_app
from gate_middleware.testing import FakeUpstream
from gate_middleware.tokens import estimate_prompt_tokens

from .conftest import ADMIN_KEY, BACKENDS, make_billing_gateway, mounted

MESSAGES = [{"role": "user", "content": "Count my money."}]
COST = estimate_prompt_tokens({"messages": MESSAGES}) * 2000 + 4 * 8000  # gpt-4.1, max_tokens=4


def client(app: Starlette, key: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=app),
        base_url="http://gate.test",
        headers={"authorization": f"Bearer {key}"},
    )


@pytest.fixture
async def gateway(upstream: FakeUpstream, database_url: str) -> AsyncIterator[Gateway]:
    gateway = make_billing_gateway(upstream, database_url)
    async with gateway:
        yield gateway


@pytest.fixture
async def admin(gateway: Gateway) -> AsyncIterator[httpx2.AsyncClient]:
    async with client(mounted(gateway), ADMIN_KEY) as http:
        yield http


async def ok(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()  # type: ignore[no-any-return]


async def chat(http: httpx2.AsyncClient, **extra: Any) -> httpx2.Response:
    return await http.post(
        "/v1/chat/completions",
        json={
            "model": "openai/gpt-4.1",
            "messages": MESSAGES,
            "max_tokens": 4,
            **extra.pop("body", {}),
        },
        **extra,
    )


def assert_error(response: httpx2.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_reseller_flow_end_to_end(gateway: Gateway, admin: httpx2.AsyncClient) -> None:
    reseller = await ok(await admin.post("/v1/accounts", json={"name": "Reseller"}), 201)
    assert reseller["balance_usd"] == 0 and reseller["parent_id"] is None
    topped = await ok(
        await admin.post(
            f"/v1/accounts/{reseller['id']}/topups", json={"amount_usd": "2.5", "note": "invoice 7"}
        ),
        201,
    )
    assert topped["credits_usd"] == 2.5
    created = await ok(
        await admin.post(f"/v1/accounts/{reseller['id']}/keys", json={"name": "main"}), 201
    )
    secret = created["key"]
    assert secret.startswith("sk-gate-") and secret.startswith(created["prefix"])
    listed = await ok(await admin.get(f"/v1/accounts/{reseller['id']}/keys"))
    assert secret not in str(listed) and listed["data"][0]["prefix"] == created["prefix"]

    app = mounted(gateway)
    async with client(app, secret) as parent:
        # The reseller makes a customer at twice its own price and gives it 1 USD.
        customer = await ok(
            await parent.post(
                "/v1/accounts", json={"name": "Customer", "multiplier": 2, "rpm": 10}
            ),
            201,
        )
        assert customer["parent_id"] == reseller["id"]
        await ok(
            await parent.post(f"/v1/accounts/{customer['id']}/topups", json={"amount_usd": 1}), 201
        )
        child_key = (
            await ok(
                await parent.post(f"/v1/accounts/{customer['id']}/keys", json={"name": "c"}), 201
            )
        )["key"]
        # Its own balance and limits are not its own to change.
        assert_error(
            await parent.post(f"/v1/accounts/{reseller['id']}/topups", json={"amount_usd": 5}), 403
        )

        async with client(app, child_key) as child:
            first = await chat(child, headers={"x-title": "Shop"})
            assert first.status_code == 200
            await chat(child)
            # The child sees neither its parent nor a sibling.
            assert_error(
                await child.get(f"/v1/accounts/{reseller['id']}"), 404, "account_not_found"
            )
            assert_error(await child.get("/v1/ledger", params={"account_id": reseller["id"]}), 404)

            sub = await ok(await child.get("/v1/dashboard/billing/subscription"))
            assert sub["hard_limit_usd"] == 1.0
            usage = await ok(
                await child.get(
                    "/v1/dashboard/billing/usage",
                    params={"start_date": "2020-01-01", "end_date": "2100-01-01"},
                )
            )
            assert usage["total_usage"] == pytest.approx(2 * COST * 2 / 1e7)  # cents
            key_info = await ok(await child.get("/v1/key"))
            assert key_info["data"]["usage"] == pytest.approx(2 * COST * 2 / 1e9)
            assert key_info["data"]["rate_limit"]["requests"] == 10
            assert key_info["data"]["label"].startswith("sk-gate-") and child_key not in str(
                key_info
            )
            credits = await ok(await child.get("/v1/credits"))
            assert credits["data"] == {
                "total_credits": 1.0,
                "total_usage": pytest.approx(4 * COST / 1e9),
            }
            generation = await ok(
                await child.get("/v1/generation", params={"id": first.headers["x-request-id"]})
            )
            assert generation["data"]["total_cost"] == pytest.approx(2 * COST / 1e9)
            assert (
                generation["data"]["app"] == "Shop" and generation["data"]["tokens_completion"] == 4
            )
            assert_error(await child.get("/v1/generation", params={"id": "req_nope"}), 404)
            assert_error(await child.get("/v1/generation"), 400)

        # The reseller paid its own (lower) price for the customer's requests.
        overview = await ok(await parent.get("/v1/usage", params={"group_by": "account"}))
        [group] = overview["groups"]
        assert group["key"] == customer["id"] and group["requests"] == 2
        assert overview["totals"]["cost_nanos"] == 2 * COST
        customer_view = await ok(
            await parent.get("/v1/usage", params={"group_by": "app", "account_id": customer["id"]})
        )
        assert {g["key"]: g["requests"] for g in customer_view["groups"]} == {"Shop": 1, None: 1}
        assert customer_view["totals"]["cost_nanos"] == 4 * COST
        mine = await ok(await parent.get(f"/v1/accounts/{reseller['id']}"))
        assert mine["spent_usd"] == pytest.approx(2 * COST / 1e9)
        assert mine["credits_usd"] == 2.5


async def test_changes_to_a_key_or_account_apply_to_its_next_request(
    gateway: Gateway, admin: httpx2.AsyncClient
) -> None:
    """What a request pays and may do is worked out once per key and kept: a change
    through the API must reach the very next request, not one after a cache expires."""
    account = await ok(await admin.post("/v1/accounts", json={"name": "A"}), 201)
    await ok(await admin.post(f"/v1/accounts/{account['id']}/topups", json={"amount_usd": 1}), 201)
    key = await ok(await admin.post(f"/v1/accounts/{account['id']}/keys", json={"name": "k"}), 201)
    async with client(mounted(gateway), key["key"]) as http:
        assert (await chat(http)).status_code == 200
        await ok(await admin.patch(f"/v1/accounts/{account['id']}", json={"multiplier": 2}))
        assert (await chat(http)).status_code == 200
        await ok(await admin.patch(f"/v1/keys/{key['id']}", json={"multiplier": "1.5"}))
        assert (await chat(http)).status_code == 200
        assert gateway.accounting is not None
        await gateway.accounting.writer.flush()
        query = {"account_id": account["id"], "kind": "request"}
        amounts = [
            row["amount_nanos"]
            for row in (await ok(await admin.get("/v1/ledger", params=query)))["data"]
        ]
        assert amounts == [3 * COST, 2 * COST, COST]  # newest first

        await ok(
            await admin.patch(f"/v1/keys/{key['id']}", json={"allowed_models": ["openai/gpt-4o"]})
        )
        assert_error(await chat(http), 403, "model_not_allowed")
        # A spend limit now holds from the key's own purse too: what it spent (6 x COST
        # at its prices) and less than the next request's most (3 x COST).
        limit = str(Decimal(7 * COST) / 10**9)
        await ok(
            await admin.patch(
                f"/v1/keys/{key['id']}", json={"allowed_models": None, "spend_limit_usd": limit}
            )
        )
        assert_error(await chat(http), 402, "insufficient_quota")
        await ok(await admin.patch(f"/v1/keys/{key['id']}", json={"spend_limit_usd": None}))
        assert (await chat(http)).status_code == 200


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_bad_input_is_a_clear_4xx_and_writes_nothing(
    gateway: Gateway, admin: httpx2.AsyncClient
) -> None:
    parent = await ok(await admin.post("/v1/accounts", json={"name": "P", "rpm": 100}), 201)
    await ok(await admin.post(f"/v1/accounts/{parent['id']}/topups", json={"amount_usd": 1}), 201)
    child = await ok(
        await admin.post("/v1/accounts", json={"name": "C", "parent_id": parent["id"]}), 201
    )
    pid, cid = parent["id"], child["id"]

    cases = [
        (f"/v1/accounts/{pid}/topups", {"amount_usd": -5}, 400, None),
        (f"/v1/accounts/{pid}/topups", {"amount_usd": 0}, 400, None),
        (f"/v1/accounts/{pid}/topups", {"amount_usd": "1e12"}, 400, None),
        (f"/v1/accounts/{pid}/topups", {"amount_usd": "0.0000000001"}, 400, None),
        (f"/v1/accounts/{pid}/topups", {"amount_usd": "lots"}, 400, None),
        (f"/v1/accounts/{pid}/topups", {"amount_usd": True}, 400, None),
        (f"/v1/accounts/{pid}/topups", {}, 400, None),
        (f"/v1/accounts/{cid}/topups", {"amount_usd": 2}, 400, "insufficient_parent_balance"),
        (f"/v1/accounts/{pid}/adjustments", {"amount_usd": -2}, 400, "negative_balance"),
        ("/v1/accounts/acct_nobody/topups", {"amount_usd": 1}, 404, "account_not_found"),
        ("/v1/accounts", {"name": "X", "parent_id": "acct_nobody"}, 404, None),
        ("/v1/accounts", {"name": ""}, 400, None),
        ("/v1/accounts", {"name": "X", "multiplier": -1}, 400, None),
        ("/v1/accounts", {"name": "X", "rpm": 0}, 400, None),
        ("/v1/accounts", {"name": "X", "colour": "red"}, 400, None),
        ("/v1/accounts", {"name": "X", "parent_id": pid, "rpm": 1000}, 400, None),
    ]
    for path, body, status, code in cases:
        assert_error(await admin.post(path, json=body), status, code)
    assert_error(await admin.post(f"/v1/accounts/{pid}/topups", content=b"{oops"), 400)

    # Spend something, then try to set a quota below it.
    key = (await ok(await admin.post(f"/v1/accounts/{pid}/keys", json={"name": "k"}), 201))["key"]
    async with client(mounted(gateway), key) as http:
        assert (await chat(http)).status_code == 200
    assert_error(
        await admin.patch(f"/v1/accounts/{pid}", json={"spend_limit_usd": "0.000000001"}),
        400,
        "below_spent",
    )
    assert_error(await admin.patch("/v1/keys/key_nobody", json={"enabled": False}), 404)

    after = await ok(await admin.get(f"/v1/accounts/{pid}"))
    assert after["credits_usd"] == 1.0 and after["spend_limit_usd"] is None
    assert (await ok(await admin.get(f"/v1/accounts/{cid}")))["credits_usd"] == 0
    ledger = await ok(await admin.get("/v1/ledger", params={"account_id": pid, "kind": "topup"}))
    assert len(ledger["data"]) == 1
    assert_error(
        await admin.get("/v1/usage", params={"account_id": pid, "group_by": "colour"}), 400
    )
    assert_error(await admin.get("/v1/ledger", params={"account_id": pid, "limit": "0"}), 400)
    assert_error(
        await admin.get("/v1/ledger", params={"account_id": pid, "start_date": "yesterday"}), 400
    )


@pytest.mark.parametrize("database_url", ["memory"], indirect=True)
async def test_ledger_pages_csv_and_openapi(gateway: Gateway, admin: httpx2.AsyncClient) -> None:
    account = await ok(await admin.post("/v1/accounts", json={"name": "A"}), 201)
    await ok(await admin.post(f"/v1/accounts/{account['id']}/topups", json={"amount_usd": 5}), 201)
    key = (
        await ok(await admin.post(f"/v1/accounts/{account['id']}/keys", json={"name": "k"}), 201)
    )["key"]
    async with client(mounted(gateway), key) as http:
        for i in range(7):
            assert (
                await chat(http, body={"model": "openai/gpt-4o" if i % 2 else "openai/gpt-4.1"})
            ).status_code == 200
        assert (
            await http.post(
                "/v1/chat/completions",
                json={
                    "model": "openai/gpt-4.1",
                    "messages": MESSAGES,
                    "max_tokens": 4,
                    "fake_fault": {"status": 503},
                },
            )
        ).status_code == 503
        seen, cursor = [], None
        while True:
            page = await ok(
                await http.get(
                    "/v1/ledger", params={"limit": 3, **({"cursor": cursor} if cursor else {})}
                )
            )
            seen += page["data"]
            cursor = page["next_cursor"]
            if not page["has_more"]:
                break
        assert len(seen) == 9  # 8 requests + the top-up
        assert [r["status"] for r in seen if r["kind"] == "request"][0] == 503
        by_model = await ok(await http.get("/v1/usage", params={"group_by": "model"}))
        assert {g["key"]: g["requests"] for g in by_model["groups"]} == {
            "openai/gpt-4.1": 5,
            "openai/gpt-4o": 3,
        }
        assert by_model["totals"]["requests"] == 8 and by_model["totals"]["errors"] == 1
        failed = await ok(await http.get("/v1/ledger", params={"status": 503}))
        assert len(failed["data"]) == 1 and failed["data"][0]["amount_nanos"] == 0
        exported = await http.get("/v1/ledger.csv", params={"kind": "request"})
        assert exported.status_code == 200 and exported.headers["content-type"].startswith(
            "text/csv"
        )
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert len(rows) == 8 and {r["model_id"] for r in rows} == {
            "openai/gpt-4.1",
            "openai/gpt-4o",
        }
        assert sum(float(r["amount_usd"]) for r in rows) == pytest.approx(
            (await ok(await http.get("/v1/credits")))["data"]["total_usage"]
        )
        schema = await ok(await http.get("/v1/openapi.json"))
        assert (
            schema["openapi"].startswith("3.")
            and "/accounts/{account_id}/topups" in schema["paths"]
        )


async def test_billing_without_the_v1_prefix(tmp_path: Any) -> None:
    from gate_middleware import GateSettings

    settings = GateSettings(database_url=f"sqlite:///{tmp_path}/demo.db", admin_key=ADMIN_KEY)
    app = create_app(settings)
    gateway: Gateway = app.state.gateway
    async with gateway, client(app, ADMIN_KEY) as admin:
        account = await ok(await admin.post("/v1/accounts", json={"name": "A"}), 201)
        await ok(
            await admin.post(f"/v1/accounts/{account['id']}/topups", json={"amount_usd": 3}), 201
        )
        key = (
            await ok(
                await admin.post(f"/v1/accounts/{account['id']}/keys", json={"name": "k"}), 201
            )
        )["key"]
        async with client(app, key) as http:
            for path in ("/dashboard/billing/subscription", "/v1/dashboard/billing/subscription"):
                assert (await ok(await http.get(path)))["hard_limit_usd"] == 3.0
            assert (await ok(await http.get("/dashboard/billing/usage")))["total_usage"] == 0
            assert_error(
                await http.get(
                    "/dashboard/billing/subscription", headers={"authorization": "Bearer nope"}
                ),
                401,
            )
