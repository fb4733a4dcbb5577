"""The money side, composed: keys -> principals, prices, quota holds, ledger rows.

`Accounting` is a `Guard` (model permission, price check, quota hold before the call;
cost and spend after) and a record hook (one ledger row per level for every request,
also those refused before any call). The gateway builds it when a database is set.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable

from .accounts import AccountKeys, Accounts, model_allowed
from .auth import Principal, StaticKeys
from .errors import GateError, InvalidRequestError, PermissionDeniedError
from .metering import LedgerWriter, ledger_rows, request_cost
from .pricing import Price, level_costs, nanos_from_usd, price_of
from .quota import LeaseBook
from .record import RequestRecord
from .retry import Candidate
from .routing import Catalogue, ModelEntry
from .settings import GateSettings
from .storage import Spend, Storage

__all__ = ["Accounting"]

logger = logging.getLogger("gate_middleware")


class Accounting:
    def __init__(self, storage: Storage, settings: GateSettings, catalogue: Catalogue) -> None:
        self.storage = storage
        self._catalogue = catalogue
        self._reject_unpriced = settings.unpriced_models == "reject"
        self._max_tokens = settings.quota_max_tokens
        self.writer = LedgerWriter(
            storage, batch=settings.ledger_batch_size, interval=settings.ledger_flush_seconds
        )
        self.book = (
            LeaseBook(
                storage,
                self.writer,
                slice_nanos=nanos_from_usd(settings.quota_lease_usd),
                lease_seconds=settings.quota_lease_seconds,
            )
            if settings.quota
            else None
        )
        static = [key.get_secret_value() for key in settings.api_keys]
        self.keys = AccountKeys(
            storage,
            admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
            static=StaticKeys(static) if static else None,
            cache_seconds=settings.key_cache_seconds,
        )
        self.accounts = Accounts(
            storage,
            max_credit=nanos_from_usd(settings.max_credit_usd),
            on_change=self.keys.forget,
            leases=self.book,
        )
        self._prices: dict[str | None, Price | None] = {}
        # Per model alone: its prices and its context fallback's (see `_prices_of`).
        self._hold_prices: dict[str, list[Price]] = {}

    async def startup(self) -> None:
        await self.storage.open()
        await self.writer.start()
        if self.book is not None:
            await self.book.start()

    async def aclose(self) -> None:
        try:
            if self.book is not None:
                await self.book.stop()
            await self.writer.stop()
        finally:
            await self.storage.close()

    def price(self, model_id: str | None) -> Price | None:
        if model_id not in self._prices:
            entry = self._catalogue.resolve(model_id) if model_id else None
            price = self._prices[model_id] = price_of(entry) if entry else None
            if entry is not None and price is None and not self._reject_unpriced:
                logger.warning(
                    "The model %s has no price: it is served at zero cost "
                    "(GATE_UNPRICED_MODELS=free). Give it a price in GATE_MODELS.",
                    model_id,
                )
        return self._prices[model_id]

    # Guard -------------------------------------------------------------------------

    async def admit(self, record: RequestRecord) -> None:
        principal = record.principal
        if principal.admin:
            raise PermissionDeniedError(
                "The admin key manages accounts; make model requests with an account's key.",
                code="admin_key",
            )
        if not principal.chain:
            return  # a settings key: metered, no balance
        if not record.model:
            # A host route's own request (GateMiddleware): no model of its own, so only
            # a balance check, a hold of the least amount, given back when it settles.
            if self.book is not None:
                wanted = [
                    (self.book.purse("account", lvl.account_id), 1) for lvl in principal.chain
                ]
                record.extra["holds"] = await self.book.hold(wanted)
            return
        # The model that answers is known only after the call (retries may fall back
        # to another), so the hold covers the dearest model that could answer.
        entry = self._catalogue.resolve(record.model)
        refused = self._refusal(principal, entry, record.model)
        if refused is not None:
            raise refused
        candidates = record.candidates
        if len(candidates) > 1 or (candidates and candidates[0].entry is not entry):
            candidates = record.candidates = self._servable(principal, candidates)
        for candidate in candidates:
            if candidate.entry.context_fallback is not None:
                candidates = record.candidates = self._long_prompts(principal, candidates)
                break
        if self.book is None:
            return
        completion = (
            0
            if record.endpoint == "embeddings"
            else (record.max_completion_tokens or self._max_tokens) * record.choices
        )
        if len(candidates) <= 1:  # the usual case: one model, its prices kept
            only = candidates[0].entry if candidates else entry
            prices = self._hold_prices.get(only.id)
            if prices is None:
                prices = self._hold_prices[only.id] = self._prices_of([only])
        else:
            prices = self._prices_of({c.entry.id: c.entry for c in candidates}.values())
        if not prices:
            return
        prompt = record.estimated_prompt_tokens
        base = prices[0].cost(prompt, completion)
        for other in prices[1:]:
            base = max(base, other.cost(prompt, completion))
        most = level_costs(base, principal)
        wanted = [
            (self.book.purse("account", level.account_id), cost)
            for level, cost in zip(principal.chain, most)
        ]
        if principal.spend_limit is not None and principal.key_id:
            wanted.append((self.book.purse("key", principal.key_id), most[-1]))
        record.extra["holds"] = await self.book.hold(wanted)

    def _prices_of(self, models: Iterable[ModelEntry]) -> list[Price]:
        """The prices of these models, and of the longer-context model each may hand a
        long prompt to."""
        return [
            price
            for model in models
            for model_id in (model.id, model.context_fallback)
            if model_id and (price := self.price(model_id)) is not None
        ]

    def _long_prompts(self, principal: Principal, candidates: list[Candidate]) -> list[Candidate]:
        """A candidate's context fallback (tried with a prompt too long for it) that the key
        may not use, or that cannot be billed, is taken off it."""
        kept = list(candidates)
        for n, candidate in enumerate(candidates):
            name = candidate.entry.context_fallback
            if name is None:
                continue
            longer = self._catalogue.resolve(name)
            if self._refusal(principal, longer, longer.id) is not None:
                entry = dataclasses.replace(candidate.entry, context_fallback=None)
                kept[n] = Candidate(entry, candidate.deployment)
        return kept

    def _refusal(self, principal: Principal, entry: ModelEntry, asked: str) -> GateError | None:
        """Why this key may not be answered by this model, if it may not."""
        if not model_allowed(principal, entry.id, asked):
            return PermissionDeniedError(
                f"This key may not use the model '{asked}'.",
                param="model",
                code="model_not_allowed",
            )
        if self._reject_unpriced and self.price(entry.id) is None:
            return InvalidRequestError(
                f"The model '{asked}' has no price on this gateway, so it cannot be billed.",
                param="model",
                code="model_not_priced",
            )
        return None

    def _servable(self, principal: Principal, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates this key may be answered by: a fallback (the request's own
        `models`, or the catalogue's) the key may not use, or that cannot be billed, is
        never tried. None left: the first one's refusal."""
        kept, first = [], None
        verdicts: dict[str, GateError | None] = {}
        for candidate in candidates:
            model = candidate.entry
            if model.id not in verdicts:
                verdicts[model.id] = self._refusal(principal, model, model.id)
            refused = verdicts[model.id]
            if refused is None:
                kept.append(candidate)
            elif first is None:
                first = refused
        if not kept and first is not None:
            raise first
        return kept

    async def settle(self, record: RequestRecord) -> None:
        principal = record.principal
        if not principal.chain:
            return
        costs = request_cost(record, self.price(record.model_id))
        record.extra["costs"] = costs
        holds = record.extra.pop("holds", None)
        key_held = False
        if holds is not None and self.book is not None:
            key_held = len(holds) > len(costs)
            spends = self.book.settle(holds, costs + [costs[-1]] * (len(holds) - len(costs)))
        else:
            spends = [
                Spend("account", level.account_id, cost)
                for level, cost in zip(principal.chain, costs)
            ]
        if principal.key_id and not key_held:
            spends.append(Spend("key", principal.key_id, costs[-1]))  # the key's usage
        # Queued with the ledger rows, by the record hook: a batch's spends then always
        # travel with rows, whose first one tells whether a failed batch was committed.
        record.extra["spends"] = [s for s in spends if s.amount]

    # Record hook -------------------------------------------------------------------

    def record(self, record: RequestRecord) -> None:
        if record.endpoint == "route":
            return  # a host route's own request: its model calls carry its route and id
        costs = record.extra.get("costs")
        if costs is None:
            costs = request_cost(record, self.price(record.model_id) if record.model_id else None)
        self.writer.add(ledger_rows(record, costs, time.time()), record.extra.pop("spends", ()))
