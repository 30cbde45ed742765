"""`metalseed run`: the seed's long-running process.

The boot services of ``metalseed serve`` plus the orchestrator, in one
process: the orchestrator thread starts only once every boot service is up
(a machine must never be powered on before DHCP, TFTP and HTTP can answer
it) and stops before them. It sweeps ``discovery.ranges`` every
``run.sweep_interval`` seconds with the credentials in
``discovery.credentials_file``, so a machine racked later -- power and BMC
cable only -- is found, enrolled, netbooted and enlisted with no command.
SIGTERM or Ctrl-C stops it; a restart resumes from the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .. import actions
from ..boot.serve import ServeInfo, serve
from ..config import Config
from .orchestrator import Orchestrator, start_thread

log = logging.getLogger(__name__)


def make_orchestrator(config: Config) -> Orchestrator:
    store = actions.open_store(config)
    driver = actions.power_driver(config)
    sweep = None
    if config.discovery.ranges and config.discovery.credentials_file is not None:

        def sweep() -> None:
            report = actions.run_discovery(config, store, driver, [], only_new=True)
            if report.results:
                failed = [r for r in report.results if r.error is not None]
                log.info(
                    "BMC sweep of %s: %d BMCs answered, %d new enrolled, %d failed",
                    ", ".join(config.discovery.ranges),
                    len(report.sweep.found),
                    len(report.results) - len(failed),
                    len(failed),
                )

    else:
        log.warning(
            "no discovery.ranges / discovery.credentials_file configured: no BMC sweeps; "
            "nodes enrolled with `metalseed discover` are still netbooted"
        )
    return Orchestrator(config, store, driver, sweep=sweep)


def make_joiner(config: Config, store, info: ServeInfo) -> Callable[[list[str]], object]:
    """The join stage, on the network the boot services serve."""
    from ..join.stage import JoinStage, settings_from

    def progress(host: str, what: str, task: str) -> None:
        if not host:
            log.info("join: %s", task)
        elif what in ("failed", "unreachable"):
            log.warning("join: %s %s: %s", host, what, task)

    stage = JoinStage(store, settings_from(config, info.network, info.address), progress=progress)
    return stage.run


def run(config: Config, *, on_ready: Callable[[ServeInfo], None] | None = None) -> None:
    """Serve and orchestrate until SIGTERM/SIGINT."""
    orchestrator = make_orchestrator(config)
    started: list = []

    def ready(info: ServeInfo) -> None:
        orchestrator.joiner = make_joiner(config, orchestrator.store, info)
        started.append(start_thread(orchestrator))
        if on_ready is not None:
            on_ready(info)

    try:
        asyncio.run(serve(config, on_ready=ready))
    finally:
        for thread, stop in started:
            stop.set()
            thread.join(timeout=max(10.0, config.bmc.job_deadline))
        orchestrator.store.close()
