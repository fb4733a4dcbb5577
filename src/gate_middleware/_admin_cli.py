"""`gate-middleware accounts | keys | topup | usage`: the management API from a shell.

These act as the admin, directly on the database (`GATE_DATABASE_URL`, by default the
embedded `sqlite:///gate.db`), so they work with no gateway running.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .accounts import Accounts, parse_fields
from .auth import Principal
from .errors import GateError, out_of_reach
from .pricing import nanos_from_usd, usd
from .providers._transport import shown
from .storage import LedgerQuery, Storage, storage_from_url

__all__ = ["add_commands"]

DEFAULT_DATABASE = "sqlite:///gate.db"
_ADMIN = Principal(id="admin", key_hint="admin", admin=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _money(nanos: int) -> str:
    return f"{usd(nanos):.6f}"


def _run(job: Callable[[Accounts, argparse.Namespace], Awaitable[None]]) -> Callable[..., int]:
    def handler(args: argparse.Namespace) -> int:
        from .settings import GateSettings

        settings = GateSettings()
        url = args.database or settings.database_url or DEFAULT_DATABASE
        if "://" not in url:
            url = f"sqlite:///{url}"  # a plain path, as `serve --database` takes it

        async def main() -> None:
            storage: Storage = storage_from_url(url)
            await storage.open()
            try:
                await job(
                    Accounts(storage, max_credit=nanos_from_usd(settings.max_credit_usd)), args
                )
            finally:
                await storage.close()

        try:
            asyncio.run(main())
        except GateError as exc:
            print(f"error: {exc.message}", flush=True)
            return 1
        except Exception as exc:
            if not out_of_reach(exc):
                raise
            print(f"error: the database at {shown(url)} is out of reach: {exc}", flush=True)
            return 1
        return 0

    return handler


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.models:
        fields["allowed_models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in ("rpm", "tpm", "multiplier"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if args.spend_limit is not None:
        fields["spend_limit_usd"] = args.spend_limit
    return fields


async def _account_create(accounts: Accounts, args: argparse.Namespace) -> None:
    account = await accounts.create_account(
        _ADMIN, {"name": args.name, "parent_id": args.parent, **_fields(args)}
    )
    print(account.id)


async def _key_create(accounts: Accounts, args: argparse.Namespace) -> None:
    account_id = args.account
    if account_id is None:
        parse_fields({"name": args.name, **_fields(args)}, creating=True)  # before the account
        account = await accounts.create_account(_ADMIN, {"name": args.new_account})
        account_id = account.id
        print(f"account: {account_id}")
    key, secret = await accounts.create_key(
        _ADMIN, account_id, {"name": args.name, **_fields(args)}
    )
    print(f"key id:  {key.id}")
    print(f"api key: {secret}")
    print("Store it now: it is not shown again.")


async def _key_list(accounts: Accounts, args: argparse.Namespace) -> None:
    keys = await accounts.storage.keys((await accounts.get(_ADMIN, args.account)).id)
    print(
        table(
            ("id", "name", "prefix", "enabled", "spent_usd", "limit_usd"),
            [
                (
                    k.id,
                    k.name,
                    k.prefix + "...",
                    "yes" if k.enabled else "no",
                    _money(k.spent),
                    _money(k.spend_limit) if k.spend_limit is not None else "-",
                )
                for k in keys
            ],
        )
    )


async def _key_disable(accounts: Accounts, args: argparse.Namespace) -> None:
    key = await accounts.update_key(_ADMIN, args.key_id, {"enabled": False})
    print(f"disabled {key.id} ({key.prefix}...)")


async def _topup(accounts: Accounts, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"amount_usd": args.amount}
    if args.note:
        body["note"] = args.note
    kind = "adjustment" if args.adjust else "topup"
    account = await accounts.credit(_ADMIN, args.account, body, kind=kind)
    print(
        f"{account.id}: credits {_money(account.credits)} USD, spent {_money(account.spent)}, "
        f"balance {_money(account.available)}"
    )


async def _usage(accounts: Accounts, args: argparse.Namespace) -> None:
    storage = accounts.storage
    if args.account is None:
        accounts_rows = [
            (a.id, a.name, _money(a.credits), _money(a.spent), _money(a.available))
            for a in await storage.children(None)
        ]
        print(table(("account", "name", "credits_usd", "spent_usd", "balance_usd"), accounts_rows))
        return
    account = await accounts.get(_ADMIN, args.account)
    days = args.days
    start = time.time() - days * 86_400 if days else None
    groups = await storage.overview(LedgerQuery(account_id=account.id, start=start), args.group_by)
    rows = [
        (
            g.key if g.key is not None else "-",
            g.requests,
            g.errors,
            g.prompt_tokens,
            g.completion_tokens,
            _money(g.amount),
        )
        for g in groups
    ]
    rows.append(
        (
            "total",
            sum(g.requests for g in groups),
            sum(g.errors for g in groups),
            sum(g.prompt_tokens for g in groups),
            sum(g.completion_tokens for g in groups),
            _money(sum(g.amount for g in groups)),
        )
    )
    print(f"{account.id} ({account.name}): balance {_money(account.available)} USD")
    print(table((args.group_by, "requests", "errors", "prompt", "completion", "cost_usd"), rows))


def _days(value: str) -> int:
    days = int(value)
    if days < 0:
        raise argparse.ArgumentTypeError("must be 0 (all) or more")
    return days


def add_commands(commands: Any) -> None:
    def parser(
        name: str, help: str, job: Callable[..., Awaitable[None]], into: Any = commands
    ) -> Any:
        command = into.add_parser(name, help=help)
        command.add_argument(
            "--database", help=f"database URL (default: GATE_DATABASE_URL or {DEFAULT_DATABASE})"
        )
        command.set_defaults(handler=_run(job))
        return command

    def limits(command: Any) -> None:
        command.add_argument(
            "--models", help="allowed models, comma-separated (patterns like openai/*)"
        )
        command.add_argument("--rpm", type=int)
        command.add_argument("--tpm", type=int)
        command.add_argument("--spend-limit", help="USD")

    accounts = commands.add_parser("accounts", help="create accounts").add_subparsers(
        dest="action", required=True
    )
    create = parser("create", "create an account", _account_create, accounts)
    create.add_argument("name")
    create.add_argument("--parent", help="parent account id (a sub-account)")
    create.add_argument("--multiplier", help="price multiplier over the parent's price")
    limits(create)

    keys = commands.add_parser("keys", help="create, list and disable keys").add_subparsers(
        dest="action", required=True
    )
    create = parser("create", "create a key (shown once)", _key_create, keys)
    where = create.add_mutually_exclusive_group(required=True)
    where.add_argument("--account", help="account id")
    where.add_argument("--new-account", metavar="NAME", help="create a top-level account too")
    create.add_argument("--name", default="default", help="the key's name")
    limits(create)
    listing = parser("list", "list an account's keys", _key_list, keys)
    listing.add_argument("--account", required=True)
    disable = parser("disable", "disable a key", _key_disable, keys)
    disable.add_argument("key_id")

    topup = parser("topup", "add credit to an account (a ledger entry)", _topup)
    topup.add_argument("account")
    topup.add_argument("amount", help="USD")
    topup.add_argument("--note")
    topup.add_argument("--adjust", action="store_true", help="an adjustment (may be negative)")

    usage = parser("usage", "balances, or one account's costs as a table", _usage)
    usage.add_argument("--account")
    usage.add_argument(
        "--group-by", default="day", choices=("day", "model", "key", "account", "app", "route")
    )
    usage.add_argument("--days", type=_days, default=30, help="how far back (0: all)")
