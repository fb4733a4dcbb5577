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

from .conftest import ADMIN_KEY, BACKENDS, fund, make_billing_gateway, mounted

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
        # The schema states the bounds the API holds to (see the 400 test).
        fields = schema["components"]["schemas"]["KeyCreate"]["properties"]
        assert fields["rpm"]["maximum"] == 2**31 - 1
        assert fields["expires_at"]["maximum"] == 253_402_300_799


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


@pytest.mark.parametrize("database_url", ["memory"], indirect=True)
async def test_a_key_cannot_change_its_own_account_or_keys(
    gateway: Gateway, admin: httpx2.AsyncClient
) -> None:
    """An account's keys are its parent's (or the admin's) to write: else a key could
    lift its own limits, price itself at a thousandth or disable its siblings."""
    account, secret = await fund(
        gateway, "5", key={"spend_limit_usd": "0.01", "allowed_models": ["openai/gpt-4.1-mini"]}
    )
    sibling = await ok(await admin.post(f"/v1/accounts/{account}/keys", json={"name": "s"}), 201)
    async with client(mounted(gateway), secret) as own:
        keys = (await ok(await own.get(f"/v1/accounts/{account}/keys")))["data"]
        mine = next(k for k in keys if k["id"] != sibling["id"])
        for method, path, body in (
            ("POST", f"/v1/accounts/{account}/keys", {"name": "free", "multiplier": 0.001}),
            ("PATCH", f"/v1/keys/{mine['id']}", {"multiplier": 0.001}),
            ("PATCH", f"/v1/keys/{mine['id']}", {"spend_limit_usd": None, "allowed_models": None}),
            ("PATCH", f"/v1/keys/{sibling['id']}", {"enabled": False}),
            ("DELETE", f"/v1/keys/{sibling['id']}", None),
            ("PATCH", f"/v1/accounts/{account}", {"multiplier": 0.001}),
        ):
            assert_error(await own.request(method, path, json=body), 403, "permission_denied")
        # Nothing changed: still the one key and its sibling, with their limits.
        after = {
            k["id"]: k for k in (await ok(await own.get(f"/v1/accounts/{account}/keys")))["data"]
        }
        assert set(after) == {mine["id"], sibling["id"]}
        assert after[mine["id"]] == mine and after[sibling["id"]]["enabled"] is True
        assert (await ok(await own.get("/v1/key")))["data"]["limit"] == 0.01
        assert_error(await chat(own), 403, "model_not_allowed")

    # Below its own account a key manages everything.
    async with client(mounted(gateway), sibling["key"]) as manager:
        child = await ok(await manager.post("/v1/accounts", json={"name": "C"}), 201)
        key = await ok(
            await manager.post(f"/v1/accounts/{child['id']}/keys", json={"name": "k"}), 201
        )
        patched = await ok(await manager.patch(f"/v1/keys/{key['id']}", json={"multiplier": 2}))
        assert patched["multiplier"] == "2"
        assert (await ok(await manager.delete(f"/v1/keys/{key['id']}")))["enabled"] is False
    # And the admin manages the top-level account's keys.
    assert (await ok(await admin.delete(f"/v1/keys/{sibling['id']}")))["enabled"] is False


@pytest.mark.parametrize("database_url", ["memory"], indirect=True)
async def test_a_sub_account_pattern_cannot_allow_what_its_parent_does_not(
    gateway: Gateway,
) -> None:
    """Patterns were checked against the parent's as names: "[!mini]*" contains "mini",
    so "*mini*" let it through, and it matches "openai/gpt-4.1". An account limited to
    the mini models made a customer (or itself a key below) that used gpt-4.1."""
    _, secret = await fund(gateway, "5", allowed_models=["*mini*"])
    async with client(mounted(gateway), secret) as manager:
        assert_error(
            await manager.post("/v1/accounts", json={"name": "C", "allowed_models": ["[!mini]*"]}),
            400,
        )
        child = await ok(
            await manager.post(
                "/v1/accounts", json={"name": "C", "allowed_models": ["openai/gpt-4.1-mini"]}
            ),
            201,
        )
        await manager.post(f"/v1/accounts/{child['id']}/topups", json={"amount_usd": 1})
    # A pattern stored before the check was tightened allows no more either (here,
    # nothing: what is left of it within the parent's).
    assert gateway.accounting is not None
    await gateway.accounting.storage.update_account(child["id"], {"allowed_models": ("[!mini]*",)})
    async with client(mounted(gateway), secret) as manager:
        key = await ok(
            await manager.post(f"/v1/accounts/{child['id']}/keys", json={"name": "k"}), 201
        )
    async with client(mounted(gateway), key["key"]) as customer:
        assert_error(await chat(customer), 403, "model_not_allowed")
    # A "*text" parent whose text ends a set: "x[!a]" ends with "a]", yet matches "xb".
    _, bracketed = await fund(gateway, "5", allowed_models=["*a]"])
    async with client(mounted(gateway), bracketed) as manager:
        child_pattern = {"name": "D", "allowed_models": ["x[!a]"]}
        assert_error(await manager.post("/v1/accounts", json=child_pattern), 400)


@pytest.mark.parametrize("database_url", ["memory"], indirect=True)
@pytest.mark.parametrize(
    "limits",
    [
        {"spend_limit_usd": "0.01"},
        {"allowed_models": ["openai/gpt-4.1-mini"]},
        {"rpm": 2},
        {"expires_at": 4e9},
        {"multiplier": 2},
    ],
)
async def test_a_key_with_limits_cannot_escape_them_through_a_sub_account(
    gateway: Gateway, admin: httpx2.AsyncClient, limits: dict[str, Any]
) -> None:
    """A sub-account's keys spend the same account's money at the sub-account's own
    limits, so a key with limits of its own only reads."""
    account, secret = await fund(gateway, "5", key=limits)
    child = await ok(
        await admin.post("/v1/accounts", json={"name": "C", "parent_id": account}), 201
    )
    async with client(mounted(gateway), secret) as limited:
        for method, path, body in (
            ("POST", "/v1/accounts", {"name": "free"}),
            ("POST", f"/v1/accounts/{child['id']}/topups", {"amount_usd": 1}),
            ("POST", f"/v1/accounts/{child['id']}/keys", {"name": "free"}),
            ("PATCH", f"/v1/accounts/{child['id']}", {"name": "mine"}),
        ):
            assert_error(await limited.request(method, path, json=body), 403, "permission_denied")
        assert (await ok(await limited.get(f"/v1/accounts/{child['id']}")))["credits_usd"] == 0
        assert len((await ok(await limited.get("/v1/accounts")))["data"]) == 1
        assert (await ok(await limited.get(f"/v1/accounts/{child['id']}/keys")))["data"] == []


@pytest.mark.parametrize("database_url", ["memory"], indirect=True)
async def test_top_ups_of_children_add_up_to_what_the_parent_has(gateway: Gateway) -> None:
    parent, secret = await fund(gateway, "1")
    async with client(mounted(gateway), secret) as http:
        child = await ok(await http.post("/v1/accounts", json={"name": "C"}), 201)
        topups = f"/v1/accounts/{child['id']}/topups"
        assert (await ok(await http.post(topups, json={"amount_usd": "0.6"}), 201))[
            "credits_usd"
        ] == 0.6
        refused = await http.post(topups, json={"amount_usd": "0.6"})
        assert_error(refused, 400, "insufficient_parent_balance")
        assert "0.4 USD left to give" in refused.json()["error"]["message"]
        await ok(await http.post(topups, json={"amount_usd": "0.4"}), 201)
        assert_error(await http.post(topups, json={"amount_usd": "0.01"}), 400)
        key = (
            await ok(await http.post(f"/v1/accounts/{child['id']}/keys", json={"name": "k"}), 201)
        )["key"]
        assert (await ok(await http.get(f"/v1/accounts/{parent}")))["credits_usd"] == 1.0
    async with client(mounted(gateway), key) as http:
        credits = await ok(await http.get("/v1/credits"))
        assert credits["data"]["total_credits"] == 1.0
        subscription = await ok(await http.get("/v1/dashboard/billing/subscription"))
        assert subscription["hard_limit_usd"] == 1.0


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_an_idle_lease_does_not_block_a_lower_spend_limit(
    gateway: Gateway, admin: httpx2.AsyncClient
) -> None:
    """A process leases $1 slices; one left idle after a request is given back, not
    counted as spent. Money another process holds is, and the message says so."""
    account, secret = await fund(gateway, "5", key={"spend_limit_usd": "2"})
    async with client(mounted(gateway), secret) as http:
        assert (await chat(http)).status_code == 200
        [key] = (await ok(await http.get(f"/v1/accounts/{account}/keys")))["data"]
        held = await ok(await admin.get(f"/v1/accounts/{account}"))
        assert held["held_usd"] > 0.5  # the rest of this process's slice
        for path in (f"/v1/accounts/{account}", f"/v1/keys/{key['id']}"):
            changed = await ok(await admin.patch(path, json={"spend_limit_usd": "0.5"}))
            assert changed["spend_limit_usd"] == 0.5
        # Another process takes 0.3 USD of what is left, this one the rest.
        assert gateway.accounting is not None
        other = await gateway.accounting.storage.lease(
            "account", account, need=300_000_000, want=300_000_000, owner="p2", expires_at=2e9
        )
        assert other is not None
        assert (await chat(http)).status_code == 200

        refused = await admin.patch(f"/v1/accounts/{account}", json={"spend_limit_usd": "0.2"})
        assert_error(refused, 400, "below_spent")
        message = refused.json()["error"]["message"]
        spent = Decimal(2 * COST) / 10**9
        assert f"already spent ({spent} USD)" in message and "hold to spend (0.3 USD)" in message
        assert (await ok(await admin.get(f"/v1/accounts/{account}")))["spend_limit_usd"] == 0.5


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_values_no_backend_holds_are_400_on_every_backend(
    upstream: FakeUpstream, database_url: str
) -> None:
    """Numbers past what PostgreSQL holds, times past the year 9999, non-ASCII digits and
    NUL characters were a 500 on some backends (a torn CSV for one); now the same 400
    (or 404 for an id) everywhere, and nothing is written."""
    gateway = make_billing_gateway(upstream, database_url, max_credit_usd="9000000000")
    async with gateway:
        account, secret = await fund(gateway, "5")
        async with client(mounted(gateway), ADMIN_KEY) as admin:
            await check_writes(admin, account)
        async with client(mounted(gateway), secret) as http:
            await check_reads(http)


async def check_writes(admin: httpx2.AsyncClient, account: str) -> None:
    [key] = (await ok(await admin.get(f"/v1/accounts/{account}/keys")))["data"]
    writes = [
        ("/v1/accounts", {"name": "X", "spend_limit_usd": "1e30"}, "spend_limit_usd"),
        ("/v1/accounts", {"name": "X", "rpm": 2**63 + 1}, "rpm"),
        ("/v1/accounts", {"name": "X", "tpm": 2**31}, "tpm"),
        ("/v1/accounts", {"name": "X", "expires_at": 1e300}, "expires_at"),
        ("/v1/accounts", {"name": "X", "expires_at": -1.0}, "expires_at"),
        ("/v1/accounts", {"name": "X\x00"}, "name"),
        ("/v1/accounts", {"name": "X", "allowed_models": ["openai/\x00"]}, "allowed_models"),
        ("/v1/accounts", {"name": "X", "allowed_models": ["m" * 257]}, "allowed_models"),
        (f"/v1/accounts/{account}/keys", {"name": "k", "expires_at": 1e300}, "expires_at"),
        (f"/v1/accounts/{account}/topups", {"amount_usd": "1e999999999"}, "amount_usd"),
        (f"/v1/accounts/{account}/topups", {"amount_usd": 1, "note": "\x00"}, "note"),
    ]
    for path, body, param in writes:
        refused = await admin.post(path, json=body)
        assert_error(refused, 400)
        assert refused.json()["error"]["param"] == param
    assert_error(await admin.patch(f"/v1/keys/{key['id']}", json={"expires_at": 1e300}), 400)
    # The credits themselves stay within what the database holds.
    topups = f"/v1/accounts/{account}/topups"
    await ok(await admin.post(topups, json={"amount_usd": "9000000000"}), 201)
    assert_error(await admin.post(topups, json={"amount_usd": "9000000000"}), 400)
    assert len((await ok(await admin.get("/v1/accounts")))["data"]) == 1
    assert len((await ok(await admin.get(f"/v1/accounts/{account}/keys")))["data"]) == 1
    assert (await ok(await admin.get(f"/v1/accounts/{account}")))["credits_usd"] == 9e9 + 5


async def check_reads(http: httpx2.AsyncClient) -> None:
    reads = [
        ("/v1/usage", {"start_date": "1e300"}, "start_date"),
        ("/v1/usage", {"end_date": "inf"}, "end_date"),
        ("/v1/ledger", {"start_date": "nan"}, "start_date"),
        ("/v1/dashboard/billing/usage", {"start_date": "-inf"}, "start_date"),
        ("/v1/ledger", {"status": "99999999999999999999"}, "status"),
        ("/v1/ledger", {"cursor": "99999999999999999999"}, "cursor"),
        ("/v1/ledger", {"limit": "9" * 5000}, "limit"),
        ("/v1/ledger", {"status": "\u00b2"}, "status"),
        ("/v1/ledger", {"limit": "\u00b2"}, "limit"),
        ("/v1/ledger", {"cursor": "\u00b2"}, "cursor"),
        ("/v1/ledger", {"model": "\x00"}, "model"),
        ("/v1/ledger.csv", {"status": "99999999999999999999"}, "status"),
        ("/v1/ledger.csv", {"cursor": "99999999999999999999"}, "cursor"),
    ]
    for path, params, param in reads:
        refused = await http.get(path, params=params)
        assert_error(refused, 400)
        assert refused.json()["error"]["param"] == param
    for path in ("/v1/accounts/%00", "/v1/keys/%00", "/v1/generation?id=%00"):
        assert_error(await http.get(path), 404)
    last = await ok(await http.get("/v1/ledger", params={"cursor": str(2**63 - 1)}))
    assert [row["kind"] for row in last["data"]] == ["topup", "topup"]


@pytest.mark.parametrize("database_url", ["memory"], indirect=True)
async def test_a_time_stored_before_input_was_bounded_still_shows(gateway: Gateway) -> None:
    account, secret = await fund(gateway, "1")
    assert gateway.accounting is not None
    storage = gateway.accounting.storage
    [key] = await storage.keys(account)
    await storage.update_key(key.id, {"expires_at": 1e300})
    async with client(mounted(gateway), secret) as http:
        shown = await ok(await http.get("/v1/key"))
        assert shown["data"]["expires_at"] == "9999-12-31T23:59:59Z"


@pytest.mark.parametrize("database_url", ["memory"], indirect=True)
async def test_billing_and_management_answers_carry_the_request_id(
    upstream: FakeUpstream, database_url: str
) -> None:
    gateway = make_billing_gateway(upstream, database_url, cors_origins=["*"])
    async with gateway:
        account, secret = await fund(gateway, "5")
        async with client(mounted(gateway), secret) as http:
            first = await chat(http)
            paths = [
                "/v1/key",
                "/v1/credits",
                f"/v1/generation?id={first.headers['x-request-id']}",
                "/v1/dashboard/billing/subscription",
                "/v1/dashboard/billing/usage",
                "/v1/usage",
                "/v1/ledger",
                "/v1/ledger.csv",
                "/v1/openapi.json",
                "/v1/accounts",
                f"/v1/accounts/{account}",
                f"/v1/accounts/{account}/keys",
            ]
            for path in paths:
                answer = await http.get(path, headers={"x-request-id": "mine-1"})
                assert answer.status_code == 200, path
                assert answer.headers["x-request-id"] == "mine-1", path
                assert (await http.get(path)).headers["x-request-id"].startswith("req_"), path
            created = await http.post("/v1/accounts", json={"name": "C"})
            assert created.status_code == 201 and created.headers["x-request-id"]
            preflight = await http.options(
                "/v1/chat/completions",
                headers={
                    "origin": "http://app.test",
                    "access-control-request-method": "POST",
                    "x-request-id": "mine-2",
                },
            )
            assert preflight.status_code == 200
            assert preflight.headers["x-request-id"] == "mine-2"
            assert preflight.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_what_a_caller_names_itself_is_stored_short_and_exported_as_text(
    gateway: Gateway,
) -> None:
    """X-Title is the caller's to write: 10 MB of it was stored in each ledger row (of a
    refused request too), and "=HYPERLINK(...)" reached the CSV a parent or the admin
    opens in a spreadsheet, as a formula."""
    _, key = await fund(gateway, "1")
    async with client(mounted(gateway), key) as http:
        formula = '=HYPERLINK("http://evil.test","invoice")'
        assert (await chat(http, headers={"x-title": formula})).status_code == 200
        assert (await chat(http, headers={"x-title": "x" * 100_000})).status_code == 200
        await gateway.accounting.writer.flush()  # type: ignore[union-attr]
        rows = (await ok(await http.get("/v1/ledger", params={"kind": "request"})))["data"]
        assert sorted(len(r["app"]) for r in rows) == [len(formula), 256]
        exported = await http.get("/v1/ledger.csv", params={"kind": "request"})
        apps = {r["app"] for r in csv.DictReader(io.StringIO(exported.text))}
        assert "'" + formula in apps and formula not in apps


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_database_out_of_reach_is_a_503_on_every_api(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Billing, cost analysis and management answered 500 internal_error when their
    database was out of reach: a 503 tells clients and SDKs to try again."""
    account, key = await fund(gateway, "1")
    async with client(mounted(gateway), key) as http, client(mounted(gateway), ADMIN_KEY) as root:
        assert (await chat(http)).status_code == 200  # the key is cached
        storage = gateway.accounting.storage  # type: ignore[union-attr]

        async def gone(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionResetError(104, "Connection reset by peer")

        for name in ("rows", "overview", "account", "children", "credit", "add_account"):
            monkeypatch.setattr(storage, name, gone)
        answers = [
            await http.get("/v1/credits"),
            await http.get("/v1/ledger"),
            await http.get("/v1/usage"),
            await http.get("/v1/dashboard/billing/subscription"),
            await root.post("/v1/accounts", json={"name": "x"}),
            await root.post(f"/v1/accounts/{account}/topups", json={"amount_usd": "1"}),
        ]
        for answer in answers:
            assert_error(answer, 503, "service_unavailable")
            assert "Connection reset" not in answer.text
