"""`gate-middleware serve` (the demo gateway) and the account commands (`keys`, `topup`, ...)."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Sequence

from pydantic import SecretStr, ValidationError

from .errors import ConfigurationError

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("The server needs uvicorn: pip install 'gate-middleware[server]'", file=sys.stderr)
        return 2
    from .demo import create_app
    from .settings import GateSettings

    settings = GateSettings()
    demo = not settings.api_keys and not settings.database_url
    if demo:
        # The embedded defaults: accounts and ledger in a SQLite file, a fresh admin key,
        # and (printed once started) a key of a "demo" account with some credit.
        admin = settings.admin_key or SecretStr("sk-gate-admin-" + secrets.token_urlsafe(18))
        settings = settings.model_copy(
            update={"database_url": f"sqlite:///{args.database}", "admin_key": admin}
        )
    app = create_app(settings, demo_account=demo, tune=True)
    url = f"http://{args.host}:{args.port}/v1"
    print(f"gate-middleware: OpenAI-compatible gateway at {url}", flush=True)
    if demo:
        print(f"gate-middleware: accounts and ledger in {args.database}", flush=True)
        assert settings.admin_key is not None
        print(f"gate-middleware: admin key: {settings.admin_key.get_secret_value()}", flush=True)
    elif settings.database_url:
        print(
            "gate-middleware: API keys from the database (gate-middleware keys create)", flush=True
        )
    else:
        print("gate-middleware: API keys from GATE_API_KEYS", flush=True)
    print(
        "gate-middleware: upstreams: " + ", ".join(sorted(app.state.gateway.providers)),
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gate-middleware", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the demo gateway")
    serve.add_argument("--host", default=os.environ.get("GATE_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("GATE_PORT", "8000")))
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--database",
        default="gate.db",
        help="SQLite file of the demo's accounts and ledger (when GATE_DATABASE_URL is unset)",
    )
    serve.set_defaults(handler=_serve)
    from ._admin_cli import add_commands

    add_commands(commands)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ValidationError as exc:
        # Without the values: a mistyped setting may hold a secret.
        for error in exc.errors(include_input=False, include_url=False):
            name = "GATE_" + "__".join(str(part) for part in error["loc"]).upper()
            print(f"gate-middleware: invalid setting {name}: {error['msg']}", file=sys.stderr)
        return 2
    except (ConfigurationError, ImportError) as exc:
        print(f"gate-middleware: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
