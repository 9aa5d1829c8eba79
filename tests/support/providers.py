"""A provider that wraps another: the tests' call logs override ``send`` and pass the rest on."""

from __future__ import annotations

from services.messenger.providers.base import OutgoingMessage, Provider, ProviderResult


class Wrapping:
    """Everything of the ``Provider`` protocol passed to ``inner``; subclasses watch ``send``.
    One place to pass a new protocol member on, for every wrapper."""

    def __init__(self, inner: Provider) -> None:
        self._inner = inner

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def paced(self) -> bool:
        return self._inner.paced

    @property
    def can_look_up(self) -> bool:
        return self._inner.can_look_up

    async def send(self, msg: OutgoingMessage) -> ProviderResult:
        return await self._inner.send(msg)

    async def lookup(self, msg: OutgoingMessage) -> ProviderResult | None:
        return await self._inner.lookup(msg)

    async def close(self) -> None:
        await self._inner.close()
