"""Power drivers, chosen by name from a small registry.

``ipmi`` talks to real (or simulated) BMCs through pyghmi; ``fake`` is the
in-memory driver that ships for tests and dry runs.
"""

from __future__ import annotations

from ..config import BmcConfig
from .base import BmcTarget, PowerDriver, PowerResult

__all__ = ["BmcTarget", "PowerDriver", "PowerResult", "driver_for"]


def driver_for(name: str, config: BmcConfig, **kwargs) -> PowerDriver:
    from .fake import FakePowerDriver
    from .ipmi import IpmiPowerDriver

    drivers: dict[str, type[PowerDriver]] = {"ipmi": IpmiPowerDriver, "fake": FakePowerDriver}
    try:
        cls = drivers[name]
    except KeyError:
        raise ValueError(f"unknown power driver {name!r}; known: {', '.join(drivers)}") from None
    return cls(
        timeout=config.timeout,
        attempts=config.attempts,
        backoff=config.backoff,
        power_wait=config.power_wait,
        **kwargs,
    )
