"""Typed, frozen configuration, built once: TOML file < ``METALSEED_*`` env < flags.

The file is ``/etc/metalseed/metalseed.toml`` unless ``--config`` or
``METALSEED_CONFIG`` names another. Top-level keys and one table per section::

    state_dir = "/var/lib/metalseed"

    [bmc]
    timeout = 5.0

    [discovery]
    ranges = ["10.0.8.0/22"]

Every key has an environment variable: ``METALSEED_STATE_DIR``,
``METALSEED_BMC_TIMEOUT``, ``METALSEED_DISCOVERY_RANGES`` (comma-separated
for lists). Flags override both. Unknown keys are an error, not a silent no-op.
Nothing here reads files or the environment at import time.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/metalseed/metalseed.toml")
ENV_PREFIX = "METALSEED_"


@dataclasses.dataclass(frozen=True)
class BmcConfig:
    port: int = 623
    #: seconds to wait for one BMC exchange (an IPMI command, a Redfish request)
    timeout: float = 5.0
    #: seconds a login may take before it counts as unanswered: a BMC that found the
    #: presence probe but stays silent for a username it does not know costs this much,
    #: then discovery tries the next credential
    login_timeout: float = 3.0
    #: attempts for a retryable failure, the first included
    attempts: int = 3
    #: first backoff delay in seconds; doubles per attempt
    backoff: float = 0.5
    #: seconds to wait for a machine to reach a requested power state
    power_wait: float = 30.0
    #: BMCs talked to at once
    concurrency: int = 128
    #: seconds one BMC's whole job (an enrollment, a power action) may take before it is
    #: abandoned and reported as failed, so one wedged BMC never stalls a sweep
    job_deadline: float = 120.0
    #: Redfish over HTTPS: check the BMC's certificate (false: lab use only, logged loudly)
    redfish_verify: bool = True
    #: the CA bundle Redfish certificates are checked against (empty: the system's CAs)
    redfish_ca_file: Path | None = None


@dataclasses.dataclass(frozen=True)
class DiscoveryConfig:
    #: what `metalseed discover` sweeps when no RANGE is given
    ranges: tuple[str, ...] = ()
    #: username:password per line, tried in order
    credentials_file: Path | None = None
    #: rotate to a dedicated per-BMC user after enrolling
    rotate: bool = False
    #: the BMC user metalseed creates when rotating
    rotate_username: str = "metalseed"
    #: seconds a BMC has to answer a presence probe (retries are spaced within it)
    probe_timeout: float = 0.5
    #: probe rounds (unanswered addresses are probed again)
    probe_rounds: int = 3
    #: probes in flight at once
    probe_window: int = 512


@dataclasses.dataclass(frozen=True)
class BootConfig:
    """The boot services of `metalseed serve` (DHCP, TFTP, HTTP, IPv6 RA)."""

    #: the provisioning interface; every service binds to it (or its address) only
    interface: str = ""
    #: "full" (address pool and leases) or "proxy" (PXE options only, next to another server)
    mode: str = "full"
    #: full mode: first-last address handed out, e.g. "10.20.0.100-10.20.0.199"
    pool: str = ""
    #: seconds a lease lasts (full mode)
    lease_time: int = 3600
    #: full mode: the router option; "" means none
    router: str = ""
    #: full mode: DNS servers handed out
    dns: tuple[str, ...] = ()
    #: start even when another DHCP server answers on the segment (full mode)
    force: bool = False
    #: seconds to listen for another DHCP server before starting (full mode)
    probe_seconds: float = 2.0
    #: HTTP port of the boot server
    http_port: int = 80
    #: TFTP port (iPXE binaries only)
    tftp_port: int = 69
    #: where the iPXE binaries come from (Debian's ipxe package)
    ipxe_dir: Path = Path("/usr/lib/ipxe")
    #: answer IPv6 router solicitations so iPXE does not wait for SLAAC
    router_advertisements: bool = True
    #: seconds a join token minted into a boot script stays valid
    token_ttl: int = 3600
    #: seconds the discovery token in an unknown machine's enlist script stays valid
    discovery_token_ttl: int = 900
    #: the largest enlist request (the node's inventory) accepted, in bytes
    enlist_max_body: int = 256 * 1024
    #: NTP servers enlisted nodes are told to use; empty: the seed's own address
    time_servers: tuple[str, ...] = ()
    #: extra kernel command line for the node image
    kernel_args: str = ""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The seed daemon, `metalseed run`: boot services plus the orchestrator."""

    #: seconds between BMC sweeps of discovery.ranges (0: sweep once, at start)
    sweep_interval: float = 60.0
    #: seconds between orchestrator passes over the nodes
    tick: float = 2.0
    #: set PXE and power on every newly enrolled machine (false: an operator does it)
    auto_boot: bool = True
    #: netboot attempts per machine (the first included) before it stays failed
    boot_attempts: int = 3
    #: seconds from power-on to enlisted before an attempt counts as failed
    boot_timeout: float = 900.0
    #: seconds a failed boot waits before the next attempt
    retry_delay: float = 30.0


@dataclasses.dataclass(frozen=True)
class JoinConfig:
    """The join stage: enlisted machines into the Ceph cluster (``roles/``)."""

    #: join every enlisted machine with no command (false: an operator runs
    #: `metalseed cluster join` to approve each)
    auto: bool = True
    #: seconds with no new enlist before an automatic join starts, so machines powered
    #: on together join in one run
    settle: float = 3.0
    #: the network Ceph's daemons use; empty: the provisioning network
    public_network: str = ""
    #: node ids (or hostnames) that carry the monitors; empty: the first three to enlist
    mon_labels: tuple[str, ...] = ()
    #: CRUSH racks, "node=rack" each; a node not listed takes its LLDP switch's name
    racks: tuple[str, ...] = ()
    #: extra [global] options for ceph.conf, "key=value" each
    ceph_options: tuple[str, ...] = ()
    #: seconds one join run may take before it is stopped and its nodes fail
    timeout: float = 900.0
    #: the roles the join runs (empty: the ones in the metalseed tree, roles/)
    roles_dir: Path | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    state_dir: Path = Path("/var/lib/metalseed")
    log_level: str = "info"
    bmc: BmcConfig = BmcConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    boot: BootConfig = BootConfig()
    run: RunConfig = RunConfig()
    join: JoinConfig = JoinConfig()

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def key_path(self) -> Path:
        return self.state_dir / "secret.key"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"


_SECTIONS: dict[str, type] = {
    "bmc": BmcConfig,
    "discovery": DiscoveryConfig,
    "boot": BootConfig,
    "run": RunConfig,
    "join": JoinConfig,
}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a TOML or env value to the field's declared type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(value, args[0], key)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if hint is int:
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            return value
        if hint is Path:
            return Path(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, list | tuple):
                raise ValueError("expected a list")
            (item,) = typing.get_args(hint)[:1]
            return tuple(_coerce(v, item, key) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {key}: {exc}") from None
    raise ConfigError(f"config key {key}: unsupported type {hint!r}")


def _flatten_file(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """TOML document -> {"state_dir": ..., "bmc.timeout": ...}, rejecting unknown keys."""
    top = _field_types(Config)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: [{key}] must be a table")
            known = _field_types(_SECTIONS[key])
            for sub, subvalue in value.items():
                if sub not in known:
                    raise ConfigError(f"{source}: unknown key {key}.{sub}")
                flat[f"{key}.{sub}"] = subvalue
        elif key in top:
            flat[key] = value
        else:
            raise ConfigError(f"{source}: unknown key {key}")
    return flat


def _env_keys() -> dict[str, str]:
    """METALSEED_BMC_TIMEOUT -> "bmc.timeout" for every known key."""
    keys: dict[str, str] = {}
    for name in _field_types(Config):
        if name in _SECTIONS:
            for sub in _field_types(_SECTIONS[name]):
                keys[f"{ENV_PREFIX}{name}_{sub}".upper()] = f"{name}.{sub}"
        else:
            keys[f"{ENV_PREFIX}{name}".upper()] = name
    return keys


def read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return _flatten_file(data, str(path))


def load(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the one Config: defaults < file < env < flags.

    ``flags`` uses dotted keys (``"bmc.timeout"``); ``None`` values mean
    "flag not given" and are skipped.
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}

    path = config_file or (Path(env["METALSEED_CONFIG"]) if env.get("METALSEED_CONFIG") else None)
    if path is not None:
        merged.update(read_file(path))
    elif DEFAULT_CONFIG_FILE.exists():
        merged.update(read_file(DEFAULT_CONFIG_FILE))

    for var, key in _env_keys().items():
        if var in env:
            merged[key] = env[var]

    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key.split(".")[0] not in _field_types(Config):
            raise ConfigError(f"unknown config key {key}")
        merged[key] = value

    return _build(merged)


def _build(flat: Mapping[str, Any]) -> Config:
    top_types = _field_types(Config)
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in flat.items():
        if "." in key:
            section, sub = key.split(".", 1)
            types_ = _field_types(_SECTIONS[section])
            if sub not in types_:
                raise ConfigError(f"unknown config key {key}")
            sections[section][sub] = _coerce(value, types_[sub], key)
        else:
            top[key] = _coerce(value, top_types[key], key)
    for name, cls in _SECTIONS.items():
        top[name] = cls(**sections[name])
    config = Config(**top)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    if config.bmc.attempts < 1:
        raise ConfigError("bmc.attempts must be at least 1")
    if config.bmc.concurrency < 1:
        raise ConfigError("bmc.concurrency must be at least 1")
    if config.bmc.job_deadline <= 0:
        raise ConfigError("bmc.job_deadline must be positive")
    if not 0 < config.bmc.login_timeout <= config.bmc.job_deadline:
        raise ConfigError("bmc.login_timeout must be positive and at most bmc.job_deadline")
    if config.bmc.timeout <= 0:
        raise ConfigError("bmc.timeout must be positive")
    if not 0 < config.bmc.port < 65536:
        raise ConfigError("bmc.port must be a UDP port number")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level must be one of debug, info, warning, error")
    if config.boot.mode not in ("full", "proxy"):
        raise ConfigError("boot.mode must be full or proxy")
    for name in ("http_port", "tftp_port"):
        if not 0 < getattr(config.boot, name) < 65536:
            raise ConfigError(f"boot.{name} must be a port number")
    if config.run.boot_attempts < 1:
        raise ConfigError("run.boot_attempts must be at least 1")
    for name in ("tick", "boot_timeout"):
        if getattr(config.run, name) <= 0:
            raise ConfigError(f"run.{name} must be positive")
    if config.join.timeout <= 0 or config.join.settle < 0:
        raise ConfigError("join.timeout must be positive and join.settle not negative")
    for item in (*config.join.racks, *config.join.ceph_options):
        if "=" not in item:
            raise ConfigError(f"join.racks / join.ceph_options: {item!r} is not key=value")
    for name in ("token_ttl", "discovery_token_ttl"):
        if getattr(config.boot, name) < 1:
            raise ConfigError(f"boot.{name} must be at least 1 second")
    if not 4096 <= config.boot.enlist_max_body <= 16 * 1024 * 1024:
        raise ConfigError("boot.enlist_max_body must be from 4096 to 16777216 bytes")
