"""The OpenAPI 3.1 document of the billing and management API (`GET /openapi.json`)."""

from __future__ import annotations

from typing import Any

from ..storage._common import MAX_INTEGER, MAX_TIME

__all__ = ["openapi_schema"]

_COUNT = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_INTEGER}
_LIMITS: dict[str, Any] = {
    "name": {"type": "string", "maxLength": 200},
    "enabled": {"type": "boolean"},
    "expires_at": {
        "type": ["number", "null"],
        "minimum": 0,
        "maximum": MAX_TIME,
        "description": "Unix seconds.",
    },
    "allowed_models": {
        "type": ["array", "null"],
        "items": {"type": "string"},
        "description": "Model ids or patterns ('openai/*'); null allows all the parent allows.",
    },
    "rpm": _COUNT,
    "tpm": _COUNT,
    "rpd": _COUNT,
    "max_concurrency": _COUNT,
    "spend_limit_usd": {"type": ["number", "string", "null"]},
    "multiplier": {
        "type": ["number", "string"],
        "description": "Price multiplier over the parent's price (0.001 to 1000).",
    },
}
_ERROR = {
    "description": "OpenAI-shaped error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _ok(schema: str, status: str = "200") -> dict[str, Any]:
    return {
        status: {
            "description": "OK",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        },
        "4XX": _ERROR,
    }


def _body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


_ACCOUNT_ID = {"name": "account_id", "in": "path", "required": True, "schema": {"type": "string"}}
_KEY_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
_FILTERS = [
    {"name": n, "in": "query", "schema": {"type": "string"}, "description": d}
    for n, d in (
        ("account_id", "Your account (default) or a descendant."),
        ("start_date", "YYYY-MM-DD or Unix seconds, inclusive."),
        ("end_date", "YYYY-MM-DD or Unix seconds, exclusive."),
        ("model", "Model asked or served."),
        ("key_id", "One key."),
        ("source_account_id", "Requests made by this sub-account."),
        ("status", "HTTP status."),
        ("kind", "request, topup or adjustment."),
    )
]
_PAGE = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "next_cursor"},
]


def openapi_schema(root: str = "") -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "gate-middleware management and billing API", "version": "1"},
        "servers": [{"url": root or "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                k: {"type": ["string", "null"]}
                                for k in ("message", "type", "param", "code")
                            },
                        }
                    },
                },
                "AccountCreate": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"parent_id": {"type": ["string", "null"]}, **_LIMITS},
                },
                "AccountUpdate": {"type": "object", "properties": _LIMITS},
                "KeyCreate": {"type": "object", "required": ["name"], "properties": _LIMITS},
                "Credit": {
                    "type": "object",
                    "required": ["amount_usd"],
                    "properties": {
                        "amount_usd": {
                            "type": ["number", "string"],
                            "description": "Top-ups: positive. Adjustments: either sign.",
                        },
                        "note": {"type": "string", "maxLength": 500},
                    },
                },
                "Account": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "parent_id": {"type": ["string", "null"]},
                        **_LIMITS,
                        "credits_usd": {"type": "number"},
                        "spent_usd": {"type": "number"},
                        "held_usd": {"type": "number"},
                        "balance_usd": {"type": "number"},
                        "created_at": {"type": "string", "format": "date-time"},
                    },
                },
                "Key": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "account_id": {"type": "string"},
                        "prefix": {"type": "string"},
                        "key": {"type": "string", "description": "Only in the creation answer."},
                        **_LIMITS,
                        "spent_usd": {"type": "number"},
                    },
                },
                "List": {"type": "object", "properties": {"data": {"type": "array"}}},
                "LedgerPage": {
                    "type": "object",
                    "properties": {
                        "data": {"type": "array", "items": {"type": "object"}},
                        "has_more": {"type": "boolean"},
                        "next_cursor": {"type": ["string", "null"]},
                    },
                },
                "Overview": {
                    "type": "object",
                    "properties": {
                        "group_by": {"type": "string"},
                        "groups": {"type": "array", "items": {"type": "object"}},
                        "totals": {"type": "object"},
                    },
                },
                "Object": {"type": "object"},
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/accounts": {
                "get": {
                    "summary": "Child accounts (admin: top-level ones)",
                    "parameters": [
                        {"name": "parent_id", "in": "query", "schema": {"type": "string"}}
                    ],
                    "responses": _ok("List"),
                },
                "post": {
                    "summary": "Create an account (under yours, or top-level for the admin)",
                    "requestBody": _body("AccountCreate"),
                    "responses": _ok("Account", "201"),
                },
            },
            "/accounts/{account_id}": {
                "parameters": [_ACCOUNT_ID],
                "get": {"summary": "An account and its balance", "responses": _ok("Account")},
                "patch": {
                    "summary": "Change a descendant's limits, rate or state",
                    "requestBody": _body("AccountUpdate"),
                    "responses": _ok("Account"),
                },
            },
            "/accounts/{account_id}/topups": {
                "parameters": [_ACCOUNT_ID],
                "post": {
                    "summary": "Add credit (a child never gets more than its parent has)",
                    "requestBody": _body("Credit"),
                    "responses": _ok("Account", "201"),
                },
            },
            "/accounts/{account_id}/adjustments": {
                "parameters": [_ACCOUNT_ID],
                "post": {
                    "summary": "Correct the credit either way (never below what is spent)",
                    "requestBody": _body("Credit"),
                    "responses": _ok("Account", "201"),
                },
            },
            "/accounts/{account_id}/keys": {
                "parameters": [_ACCOUNT_ID],
                "get": {"summary": "Keys (prefixes only)", "responses": _ok("List")},
                "post": {
                    "summary": "Create a key; the answer shows it once",
                    "requestBody": _body("KeyCreate"),
                    "responses": _ok("Key", "201"),
                },
            },
            "/keys/{key_id}": {
                "parameters": [_KEY_ID],
                "get": {"summary": "A key", "responses": _ok("Key")},
                "patch": {
                    "summary": "Change a key",
                    "requestBody": _body("AccountUpdate"),
                    "responses": _ok("Key"),
                },
                "delete": {"summary": "Disable a key", "responses": _ok("Key")},
            },
            "/usage": {
                "get": {
                    "summary": "Cost overview with totals",
                    "parameters": [
                        {
                            "name": "group_by",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "enum": ["day", "model", "key", "account", "app", "route"],
                            },
                        },
                        *_FILTERS,
                    ],
                    "responses": _ok("Overview"),
                }
            },
            "/ledger": {
                "get": {
                    "summary": "Ledger rows, newest first",
                    "parameters": [*_FILTERS, *_PAGE],
                    "responses": _ok("LedgerPage"),
                }
            },
            "/ledger.csv": {
                "get": {
                    "summary": "The same rows as CSV (all pages)",
                    "parameters": _FILTERS,
                    "responses": {"200": {"description": "CSV", "content": {"text/csv": {}}}},
                }
            },
            "/dashboard/billing/subscription": {
                "get": {"summary": "OpenAI / one-api: hard_limit_usd", "responses": _ok("Object")}
            },
            "/dashboard/billing/usage": {
                "get": {
                    "summary": "OpenAI / one-api: total_usage in cents",
                    "parameters": _FILTERS[1:3],
                    "responses": _ok("Object"),
                }
            },
            "/key": {"get": {"summary": "OpenRouter: this key", "responses": _ok("Object")}},
            "/credits": {"get": {"summary": "OpenRouter: credits", "responses": _ok("Object")}},
            "/generation": {
                "get": {
                    "summary": "OpenRouter: one request by its x-request-id",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": _ok("Object"),
                }
            },
        },
    }
