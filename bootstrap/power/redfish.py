"""Redfish through sushy (Ironic's Redfish library): primitives only.

Retries, waits and backoff are the base class's: sushy's own retries are
cut to the least it allows (one immediate repeat of a 5xx answer, no repeated
connection attempts), and the base decides what happens next. sushy
exceptions are translated at this boundary into the metalseed error tree;
messages name the BMC and the user, never a password or a token.

One login per operation, with HTTP basic authentication: stateless, so a
crashed operation leaves no session behind in the BMC's (often small)
session table, and every request proves the credential afresh. The TCP
connect of each request is bounded by ``login_timeout``, the wait for an
answer by ``timeout``.

A node's address names one ComputerSystem (``BmcAddress.path``); a service
address (no path) lists every System it manages, one machine each. Account
rotation goes through the service's AccountService with sushy's connector
(sushy has no account resources).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import requests
import sushy
from sushy import auth as sushy_auth
from sushy import connector as sushy_connector
from sushy import exceptions as sushy_exc

from ..errors import (
    BmcAuthError,
    BmcBusy,
    BmcCommandError,
    BmcError,
    BmcGone,
    BmcLoginTimeout,
    BmcTimeout,
    BmcUnreachable,
)
from ..models import BmcIdentity, Credential
from .base import BmcTarget, Machine, PowerDriver

log = logging.getLogger(__name__)

SYSTEMS = "/redfish/v1/Systems"
ACCOUNTS_SERVICE = "/redfish/v1/AccountService"
ADMIN_ROLE = "Administrator"
#: HTTP answers that mean "this service does not let us manage accounts"
REFUSALS = (400, 403, 404, 405, 409, 501)


class BmcTlsError(BmcCommandError):
    """The Redfish service's certificate could not be verified (fatal: retrying will not help)."""


@dataclasses.dataclass
class _Conn:
    target: BmcTarget
    root: sushy.Sushy
    connector: sushy_connector.Connector
    logging_in: bool = True


def _status(exc: sushy_exc.HTTPError) -> int:
    return int(getattr(exc, "status_code", 0) or 0)


def translate(exc: BaseException, target: BmcTarget, doing: str, *, login: bool) -> BmcError:
    """A sushy / requests exception as a metalseed error naming the service, never a secret."""
    where = f"Redfish service {target.address.service}"
    label = target.label
    if isinstance(exc, BmcError):
        return exc
    if isinstance(exc, sushy_exc.AccessError):
        if login or _status(exc) == 401:
            return BmcAuthError(
                f"{where} refused the login for user {target.credential.username!r}"
                " (wrong username or password)",
                node=label,
            )
        return BmcCommandError(f"{where}: {doing}: not allowed (HTTP 403)", node=label, code=403)
    if isinstance(exc, sushy_exc.ResourceNotFoundError):
        if target.address.path:
            return BmcGone(
                f"{where} no longer has the System {target.address.path} ({doing})", node=label
            )
        return BmcCommandError(f"{where}: {doing}: not found (HTTP 404)", node=label, code=404)
    if isinstance(exc, sushy_exc.ServerSideError):
        return BmcBusy(f"{where}: {doing}: server error HTTP {_status(exc)}", node=label)
    if isinstance(exc, sushy_exc.HTTPError):
        code = _status(exc)
        return BmcCommandError(f"{where}: {doing} failed: HTTP {code}", node=label, code=code)
    if isinstance(exc, sushy_exc.ConnectionError):
        cause = exc.__cause__ or exc.__context__  # sushy raises it inside requests' except
        if isinstance(cause, requests.exceptions.SSLError):
            return BmcTlsError(
                f"{where}: its TLS certificate is not trusted (set bmc.redfish_ca_file to the "
                "CA that signed it, or bmc.redfish_verify = false in a lab)",
                node=label,
            )
        if isinstance(cause, requests.exceptions.Timeout):
            kind = BmcLoginTimeout if login else BmcTimeout
            return kind(f"{where}: no answer while trying to {doing}", node=label)
        return BmcUnreachable(f"{where}: cannot connect ({type(cause).__name__})", node=label)
    if isinstance(exc, sushy_exc.SushyError):
        return BmcCommandError(f"{where}: {doing} failed: {type(exc).__name__}", node=label)
    return BmcCommandError(
        f"{where}: {doing} failed unexpectedly ({type(exc).__name__})", node=label
    )


def power_word(state: object) -> str:
    """'on' or 'off' for the base's wait: PoweringOff is still on, PoweringOn not yet."""
    value = getattr(state, "value", state)
    return "on" if value in ("On", "PoweringOff", "Powering Off") else "off"


class RedfishPowerDriver(PowerDriver):
    name = "redfish"

    def __init__(self, *, verify: bool = True, ca_file: Path | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.verify = verify
        self.ca_file = ca_file
        self._warned = False

    @classmethod
    def options_from(cls, config) -> dict:
        return {"verify": config.redfish_verify, "ca_file": config.redfish_ca_file}

    def _verify_arg(self) -> bool | str:
        if not self.verify:
            if not self._warned:
                self._warned = True
                log.warning(
                    "bmc.redfish_verify is false: Redfish certificates are NOT checked; anyone "
                    "on the BMC network can pose as a BMC and collect its login (lab use only)"
                )
            return False
        return str(self.ca_file) if self.ca_file else True

    # -- plumbing -------------------------------------------------------------

    def _call(self, conn: _Conn, doing: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # sushy and requests raise many types; all are translated
            raise translate(exc, conn.target, doing, login=conn.logging_in) from None

    def _connect(self, target: BmcTarget) -> _Conn:
        address = target.address
        verify = self._verify_arg() if address.scheme == "https" else False
        connector = sushy_connector.Connector(
            address.base_url,
            verify=verify,
            # 1, not 0: sushy 5 reads 0 as "3 connection attempts, 2 s apart"; with 1 a
            # refused or timed-out connection fails at once and the base retries
            server_side_retries=1,
            default_request_timeout=self.timeout,
            connect_timeout=min(self.login_timeout, self.timeout),
        )
        auth = sushy_auth.BasicAuth(
            username=target.credential.username, password=target.credential.password.reveal()
        )
        try:
            root = sushy.Sushy(address.base_url, auth=auth, connector=connector)
            conn = _Conn(target, root, connector)
            # an authenticated read proves the login (a service root may be open to all)
            connector.get(SYSTEMS)
        except Exception as exc:
            raise translate(exc, target, "log in", login=True) from None
        conn.logging_in = False
        return conn

    def _disconnect(self, conn: _Conn) -> None:
        try:
            conn.connector.close()
        except Exception:  # closing a dead connection is not an error worth raising
            pass

    def _system(self, conn: _Conn, path: str | None = None):
        path = path or conn.target.address.path
        if not path:
            raise BmcCommandError(
                f"{conn.target.address} names a Redfish service, not one of its Systems",
                node=conn.target.label,
            )
        return self._call(conn, "read the System", conn.root.get_system, path)

    # -- primitives -----------------------------------------------------------

    def _get_power(self, conn: _Conn) -> str:
        return power_word(self._system(conn).power_state)

    def _set_power(self, conn: _Conn, action: str) -> None:
        system = self._system(conn)
        allowed = self._call(conn, "read reset types", system.get_allowed_reset_system_values)
        wanted = {
            "on": [sushy.ResetType.ON],
            "off": [sushy.ResetType.FORCE_OFF],
            "cycle": [sushy.ResetType.POWER_CYCLE, sushy.ResetType.FORCE_RESTART],
        }[action]
        choice = next((w for w in wanted if not allowed or w in allowed), None)
        if choice is None:
            raise BmcCommandError(
                f"{conn.target.address}: the System offers no reset for power {action} "
                f"(it allows {', '.join(sorted(str(getattr(a, 'value', a)) for a in allowed))})",
                node=conn.target.label,
            )
        self._call(conn, f"power {action}", system.reset_system, choice)

    def _set_boot_device(self, conn: _Conn, device: str, persistent: bool) -> None:
        system = self._system(conn)
        target = {"pxe": sushy.BootSource.PXE, "disk": sushy.BootSource.HDD}[device]
        enabled = (
            sushy.BootSourceOverrideEnabled.CONTINUOUS
            if persistent
            else sushy.BootSourceOverrideEnabled.ONCE
        )
        self._call(
            conn,
            f"set boot device {device}",
            system.set_system_boot_options,
            target=target,
            enabled=enabled,
        )

    def _identity_of(self, conn: _Conn, system) -> BmcIdentity | None:
        uuid = (system.uuid or "").strip().lower()
        if not uuid:
            log.warning("%s: System %s has no UUID; skipped", conn.target.address, system.path)
            return None
        macs: list[str] = []
        try:
            for nic in system.ethernet_interfaces.get_members():
                mac = (nic.mac_address or nic.permanent_mac_address or "").lower()
                if mac and mac not in macs:
                    macs.append(mac)
        except sushy_exc.SushyError as exc:  # NICs are nice to have
            log.info("%s: System %s: no NIC list (%s)", conn.target.address, system.path, exc)
        fru = {
            "manufacturer": system.manufacturer,
            "product": system.model,
            "serial": system.serial_number,
        }
        return BmcIdentity(
            guid=uuid,
            power=power_word(system.power_state),
            fru={k: str(v) for k, v in fru.items() if v},
            macs=tuple(macs),
        )

    def _identify(self, conn: _Conn) -> BmcIdentity:
        identity = self._call(conn, "identify", self._identity_of, conn, self._system(conn))
        if identity is None:
            raise BmcCommandError(
                f"{conn.target.address}: the System reports no UUID", node=conn.target.label
            )
        return identity

    def _machines(self, target: BmcTarget, conn: _Conn) -> list[Machine]:
        address = target.address
        if address.path:
            return [Machine(address, self._identify(conn))]
        collection = self._call(conn, "list Systems", conn.root.get_system_collection)
        paths = self._call(conn, "list Systems", lambda: collection.members_identities)
        machines = []
        for path in sorted(paths):
            try:
                system = conn.root.get_system(path)
            except sushy_exc.ResourceNotFoundError:  # listed, then gone: not a machine now
                log.info("%s: listed System %s is gone (404); skipped", address, path)
                continue
            except Exception as exc:
                raise translate(exc, target, "read a System", login=False) from None
            identity = self._call(conn, "identify", self._identity_of, conn, system)
            if identity is not None:
                machines.append(Machine(dataclasses.replace(address, path=path), identity))
        return machines

    def _ensure_user(self, conn: _Conn, credential: Credential) -> None:
        refused = f"Redfish service {conn.target.address.service} refuses account creation"

        def request(method: str, path: str, data: dict | None = None):
            try:
                return getattr(conn.connector, method)(path, data=data)
            except sushy_exc.HTTPError as exc:
                if _status(exc) in REFUSALS:
                    raise BmcCommandError(
                        f"{refused} (HTTP {_status(exc)} on {method.upper()} {path})",
                        node=conn.target.label,
                        code=_status(exc),
                    ) from None
                raise translate(exc, conn.target, "manage accounts", login=False) from None
            except Exception as exc:
                raise translate(exc, conn.target, "manage accounts", login=False) from None

        service = request("get", ACCOUNTS_SERVICE).json()
        accounts = (service.get("Accounts") or {}).get("@odata.id")
        if not accounts:
            raise BmcCommandError(f"{refused} (no Accounts collection)", node=conn.target.label)
        members = request("get", accounts).json().get("Members") or []
        body = {"Password": credential.password.reveal(), "RoleId": ADMIN_ROLE, "Enabled": True}
        for member in members:
            path = member.get("@odata.id")
            if path and request("get", path).json().get("UserName") == credential.username:
                request("patch", path, body)
                return
        request("post", accounts, {"UserName": credential.username, **body})
