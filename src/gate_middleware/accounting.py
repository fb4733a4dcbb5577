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
from dataclasses import dataclass

from .accounts import AccountKeys, Accounts, model_allowed
from .auth import Principal, StaticKeys
from .errors import GateError, InvalidRequestError, PermissionDeniedError
from .metering import LedgerWriter, ledger_rows, request_cost
from .pricing import Price, Rates, level_costs, level_rates, nanos_from_usd, price_of
from .quota import LeaseBook, Purse
from .record import RequestRecord
from .retry import Candidate
from .routing import Catalogue, ModelEntry
from .settings import GateSettings
from .storage import Storage, Target

__all__ = ["Accounting"]

logger = logging.getLogger("gate_middleware")

_MAX_CACHED = 10_000  # payers and models; cleared when full
_HELD = "gate.held"  # record.extra: (payer, amounts held)


@dataclass(frozen=True, slots=True)
class _Payer:
    """What a principal's requests need for money, worked out once per principal."""

    principal: Principal
    rates: Rates
    purses: tuple[Purse, ...]  # every account's, root first, then the key's if limited
    key_purse: bool  # whether the last purse is the key's own
    accounts: tuple[tuple[Target, str, None], ...]  # spends without a quota
    usage: tuple[Target, str, None] | None  # the key's spend, when its purse held nothing


@dataclass(frozen=True, slots=True)
class _Model:
    """A requested model name: the model it resolves to, its price, and the prices of
    every model that could answer it (fallbacks too), for the hold."""

    id: str
    price: Price | None
    hold_prices: tuple[Price, ...]


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
        self._models: dict[str, _Model] = {}
        # By key id, for as long as the key's principal stays the same: a change to the
        # key or an account above it makes a new principal (see AccountKeys.forget).
        self._payers: dict[str, _Payer] = {}

    async def startup(self) -> None:
        await self.storage.open()
        await self.writer.start()
        if self.book is not None:
            await self.book.start()

    async def aclose(self) -> None:
        try:
            try:
                if self.book is not None:
                    await self.book.stop()
            finally:
                # Stopped even when the leases could not go back (the database out of
                # reach): else its task went on writing to a closed storage, for good.
                await self.writer.stop()
        finally:
            await self.storage.close()

    def price(self, model_id: str | None) -> Price | None:
        if model_id not in self._prices:
            entry = self._catalogue.resolve(model_id) if model_id else None
            if len(self._prices) >= _MAX_CACHED:
                self._prices.clear()
            price = self._prices[model_id] = price_of(entry) if entry else None
            if entry is not None and price is None and not self._reject_unpriced:
                logger.warning(
                    "The model %s has no price: it is served at zero cost "
                    "(GATE_UNPRICED_MODELS=free). Give it a price in GATE_MODELS.",
                    model_id,
                )
        return self._prices[model_id]

    def _payer(self, principal: Principal) -> _Payer:
        payer = self._payers.get(principal.id)
        if payer is not None and payer.principal is principal:
            return payer
        if len(self._payers) >= _MAX_CACHED:
            self._payers.clear()
        if payer is not None and payer.principal == principal:  # the key looked up again
            payer = dataclasses.replace(payer, principal=principal)
        else:
            purses: list[Purse] = []
            if self.book is not None:
                purses = [self.book.purse("account", level.account_id) for level in principal.chain]
                if principal.spend_limit is not None and principal.key_id:
                    purses.append(self.book.purse("key", principal.key_id))
            payer = _Payer(
                principal,
                level_rates(principal),
                tuple(purses),
                len(purses) > len(principal.chain),
                tuple(("account", level.account_id, None) for level in principal.chain),
                ("key", principal.key_id, None) if principal.key_id else None,
            )
        self._payers[principal.id] = payer
        return payer

    def _model(self, name: str) -> _Model:
        entry = self._catalogue.resolve(name)
        model = _Model(entry.id, self.price(entry.id), tuple(self._prices_of([entry])))
        if len(self._models) >= _MAX_CACHED:
            self._models.clear()
        self._models[name] = model
        return model

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
        payer = self._payers.get(principal.id)
        if payer is None or payer.principal is not principal:
            payer = self._payer(principal)
        book = self.book
        if not record.model:
            # A host route's own request (GateMiddleware): no model of its own, so only
            # a balance check, a hold of the least amount at each account, given back
            # when it settles.
            if book is not None:
                least = [1] * len(principal.chain)
                await book.hold(payer.purses, least)
                record.extra[_HELD] = (payer, least)
            return
        # The model that answers is known only after the call (retries may fall back
        # to another), so the hold covers the dearest model that could answer.
        model = self._models.get(record.model) or self._model(record.model)
        if principal.allowed_models is not None and not model_allowed(
            principal, model.id, record.model
        ):
            raise PermissionDeniedError(
                f"This key may not use the model '{record.model}'.",
                param="model",
                code="model_not_allowed",
            )
        if model.price is None and self._reject_unpriced:
            raise InvalidRequestError(
                f"The model '{record.model}' has no price on this gateway, so it cannot be billed.",
                param="model",
                code="model_not_priced",
            )
        candidates = record.candidates
        # Fallbacks (the request's own `models`, or the catalogue's): only those this
        # key may be answered by, and the hold covers the dearest of them.
        mixed = len(candidates) > 1 or (candidates and candidates[0].entry.id != model.id)
        if mixed:
            candidates = record.candidates = self._servable(principal, candidates)
        for candidate in candidates:
            if candidate.entry.context_fallback is not None:
                candidates = record.candidates = self._long_prompts(principal, candidates)
                mixed = True
                break
        if book is None:
            return
        hold_prices = model.hold_prices
        if mixed:
            hold_prices = tuple(self._prices_of({c.entry.id: c.entry for c in candidates}.values()))
        if not hold_prices:
            return
        completion = (
            0
            if record.endpoint == "embeddings"
            else (record.max_completion_tokens or self._max_tokens) * record.choices
        )
        prompt = record.estimated_prompt_tokens
        base = 0
        for price in hold_prices:
            cost = price.cost(prompt, completion)
            if cost > base:
                base = cost
        most = level_costs(base, payer.rates)
        if payer.key_purse:
            most.append(most[-1])  # the key's own spend limit
        await book.hold(payer.purses, most)
        record.extra[_HELD] = (payer, most)

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
        """The hold is settled in `record`, with the request's rows; but a request that a
        later guard refused (`Gateway.admit`, status 0) gives its hold back here and now:
        it used nothing, and its end (the record hook) may never come (GateMiddleware's
        admission failing with no GateError, or cancelled)."""
        if record.status == 0:
            self._give_back(record.extra.pop(_HELD, None))

    def _give_back(self, held: tuple[_Payer, list[int]] | None) -> None:
        """Release a hold that spent nothing."""
        if held is not None and self.book is not None:
            self.book.settle(held[0].purses, held[1], [0] * len(held[1]), {})

    # Record hook -------------------------------------------------------------------

    def record(self, record: RequestRecord) -> None:
        """Settle the hold to the real cost and queue the ledger rows with the balance
        changes, in one step with no await: a batch's spends then always travel with
        rows, whose first one tells whether a failed batch was committed. Runs for every
        request, admitted or not, after every guard has settled."""
        held: tuple[_Payer, list[int]] | None = record.extra.pop(_HELD, None)
        if record.endpoint == "route":
            # A host route's own request: its model calls carry its route and id; its
            # hold (the least amount) goes back.
            self._give_back(held)
            return
        principal = record.principal
        model_id = record.model_id  # the model that answered
        prices = self._prices
        price = prices[model_id] if model_id in prices else self.price(model_id)
        if not principal.chain:
            costs = request_cost(record, price, ())
            self.writer.add(ledger_rows(record, costs, time.time()))
            return
        payer = held[0] if held is not None else self._payer(principal)
        costs = request_cost(record, price, payer.rates)
        rows = ledger_rows(record, costs, time.time())  # made first: spends never go alone
        spends = self.writer.spends
        if held is not None and self.book is not None:
            self.book.settle(
                payer.purses, held[1], [*costs, costs[-1]] if payer.key_purse else costs, spends
            )
            usage = None if payer.key_purse else payer.usage  # the key's purse counts it
        else:
            for account, cost in zip(payer.accounts, costs):
                if cost:
                    spends[account] = spends.get(account, 0) + cost
            usage = payer.usage
        cost = costs[-1]
        if usage is not None and cost:
            spends[usage] = spends.get(usage, 0) + cost  # the key's usage
        self.writer.add(rows)
