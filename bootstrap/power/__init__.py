"""Power drivers, one per BMC kind, chosen per node at every call.

``ipmi`` talks to IPMI BMCs through pyghmi, ``redfish`` to Redfish services
through sushy; ``fake`` is the in-memory driver that ships for tests and dry
runs. A node's ``BmcAddress.driver`` names its kind, so one rack may mix
them: ``Drivers`` is the small, explicit registry that every caller (the
CLI, discovery, the orchestrator) goes through, and it offers the same
operations as a single driver, dispatched on the target's address.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..config import BmcConfig
from ..models import IPMI, REDFISH, Credential
from .base import BmcTarget, Machine, PowerDriver, PowerResult

__all__ = ["BmcTarget", "Drivers", "Machine", "PowerDriver", "PowerResult", "driver_for"]

KINDS = (IPMI, REDFISH, "fake")


def _driver_class(name: str) -> type[PowerDriver]:
    # imported on first use: the CLI's start-up should not pay for pyghmi and sushy
    if name == IPMI:
        from .ipmi import IpmiPowerDriver

        return IpmiPowerDriver
    if name == REDFISH:
        from .redfish import RedfishPowerDriver

        return RedfishPowerDriver
    if name == "fake":
        from .fake import FakePowerDriver

        return FakePowerDriver
    raise ValueError(f"unknown power driver {name!r}; known: {', '.join(KINDS)}")


def driver_for(name: str, config: BmcConfig, **kwargs) -> PowerDriver:
    cls = _driver_class(name)
    return cls(
        timeout=config.timeout,
        login_timeout=config.login_timeout,
        attempts=config.attempts,
        backoff=config.backoff,
        power_wait=config.power_wait,
        **cls.options_from(config),
        **kwargs,
    )


class Drivers:
    """The driver of each BMC kind, built once on first use; dispatches on the target.

    ``Drivers(config)`` for the product; ``Drivers.only(driver)`` answers every
    kind with one driver (the fake, in tests).
    """

    def __init__(
        self, config: BmcConfig | None = None, built: Mapping[str, PowerDriver] | None = None
    ) -> None:
        self._config = config or BmcConfig()
        self._built: dict[str, PowerDriver] = dict(built or {})
        self._fallback: PowerDriver | None = None

    @classmethod
    def only(cls, driver: PowerDriver) -> Drivers:
        drivers = cls()
        drivers._fallback = driver
        return drivers

    def __getitem__(self, kind: str) -> PowerDriver:
        if self._fallback is not None:
            return self._fallback
        if kind not in self._built:
            self._built[kind] = driver_for(kind, self._config)
        return self._built[kind]

    def of(self, target: BmcTarget) -> PowerDriver:
        return self[target.address.driver]

    # -- the operations of a driver, each dispatched on the target's kind ----------

    def power_state(self, target: BmcTarget) -> str:
        return self.of(target).power_state(target)

    def set_power(self, target: BmcTarget, action: str) -> PowerResult:
        return self.of(target).set_power(target, action)

    def set_boot_device(self, target: BmcTarget, device: str, persistent: bool = False) -> None:
        self.of(target).set_boot_device(target, device, persistent)

    def identify(self, target: BmcTarget):
        return self.of(target).identify(target)

    def list_machines(self, target: BmcTarget, *, quick_login: bool = False) -> list[Machine]:
        return self.of(target).list_machines(target, quick_login=quick_login)

    def check_login(self, target: BmcTarget) -> None:
        self.of(target).check_login(target)

    def ensure_user(self, target: BmcTarget, credential: Credential) -> None:
        self.of(target).ensure_user(target, credential)
