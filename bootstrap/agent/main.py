"""``python3 -m bootstrap.agent``: read the kernel command line, inventory, enlist, apply.

Exit status (for the systemd unit: restart on failure, but not on the final ones,
``RestartPreventExitStatus=64 65 77``):

====  ==================================================================
0     enlisted, and the answer applied
64    the kernel command line lacks the seed URL, the token or the MAC
65    the seed refused our request as malformed (400), or its answer is unusable
77    the seed refused the token (401/403): expired, replayed, not ours
74    this machine's inventory could not be read (no boot id)
75    the seed could not be reached (or kept failing) after every retry
70    the answer could not be applied (keys, firewall) -- try again
====  ==================================================================

Roots are injectable so tests run the real agent on any host without touching
it: ``--root`` for what the answer changes, ``--sys-root``/``--proc-root``/
``--dev-root``/``--dmi-dir`` for what the inventory reads, and ``--commands skip`` (the
default whenever ``--root`` is not ``/``) to leave nft, chronyc and
hostnamectl alone. Each option has a ``METALSEED_AGENT_*`` variable. The token
is read only from the command line file, never from arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .apply import AnswerError, Applier, ApplyError, check_answer
from .client import EnlistFailed, post_json
from .cmdline import CmdlineError, parse_boot_params
from .inventory import Roots, collect, read_boot_id

log = logging.getLogger("metalseed-agent")

EX_OK, EX_SOFTWARE, EX_USAGE, EX_DATAERR = 0, 70, 64, 65
EX_IOERR, EX_TEMPFAIL, EX_NOPERM = 74, 75, 77


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"METALSEED_AGENT_{name}", default)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m bootstrap.agent",
        description="Enlist this machine with the metalseed seed named on the kernel command line.",
    )
    p.add_argument("--cmdline", type=Path, default=_env("CMDLINE", "/proc/cmdline"))
    p.add_argument(
        "--root",
        type=Path,
        default=_env("ROOT", "/"),
        help="where the answer's files go (default /)",
    )
    p.add_argument("--sys-root", type=Path, default=_env("SYS_ROOT", "/sys"))
    p.add_argument("--proc-root", type=Path, default=_env("PROC_ROOT", "/proc"))
    p.add_argument("--dev-root", type=Path, default=_env("DEV_ROOT", "/dev"))
    p.add_argument(
        "--dmi-dir",
        type=Path,
        default=_env("DMI_DIR"),
        help="where product_uuid, product_serial, sys_vendor, product_name are "
        "(default SYS_ROOT/class/dmi/id)",
    )
    p.add_argument(
        "--disks",
        default=_env("DISKS"),
        help="only these block devices, comma-separated (default: all but RAM, optical, "
        "device-mapper, md and read-only or unbacked loop devices)",
    )
    p.add_argument(
        "--commands",
        choices=["run", "skip"],
        default=_env("COMMANDS"),
        help="run nft, chronyc, hostnamectl (default: run when --root is /, else skip)",
    )
    # string defaults go through ``type`` like arguments, so bad variables are usage errors.
    # 6 attempts: at most 1+2+4+8+16 s of backoff plus 6 x --timeout, inside the unit's
    # TimeoutStartSec=300; systemd restarts the unit after that.
    p.add_argument("--attempts", type=int, default=_env("ATTEMPTS", "6"))
    p.add_argument("--backoff", type=float, default=_env("BACKOFF", "1.0"))
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP attempt")
    p.add_argument(
        "--inventory-only",
        action="store_true",
        help="print the inventory as JSON and exit (no seed, no token needed)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("metalseed-agent: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _summary(inventory: dict) -> str:
    disks = inventory["disks"]
    empty = sum(1 for d in disks if d.get("empty"))
    return (
        f"{inventory['cpus']['count']} CPUs, {inventory['memory']['bytes'] // 2**20} MiB, "
        f"{len(disks)} disks ({empty} empty), {len(inventory['nics'])} NICs, "
        f"{len(inventory['lldp'])} LLDP neighbours"
    )


def run(args: argparse.Namespace) -> int:
    roots = Roots(
        sys=args.sys_root, proc=args.proc_root, dev=args.dev_root, dmi=args.dmi_dir,
        ssh=args.root / "etc" / "ssh",
    )  # fmt: skip
    only = [d.strip() for d in args.disks.split(",") if d.strip()] if args.disks else None
    if args.inventory_only:
        json.dump(collect(roots, disks_only=only), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EX_OK

    try:
        params = parse_boot_params(args.cmdline.read_text())
    except OSError as exc:
        log.error("cannot read the kernel command line %s: %s", args.cmdline, exc.strerror)
        return EX_USAGE
    except CmdlineError as exc:
        log.error("%s", exc)
        return EX_USAGE
    mode = "enlist-only (an unknown machine)" if params.enlist_mode else f"node {params.node}"
    log.info("seed %s, %s, booted from %s", params.url, mode, params.mac)

    try:
        boot_id = read_boot_id(roots)
    except (OSError, ValueError) as exc:
        log.error("no boot id: %s", exc)
        return EX_IOERR
    inventory = collect(roots, disks_only=only)
    log.info("inventory: %s", _summary(inventory))

    body = {"mac": params.mac, "node": params.node, "boot_id": boot_id, "inventory": inventory}
    try:
        data = post_json(
            params.enlist_url,
            params.token,
            body,
            attempts=max(1, args.attempts),
            backoff=args.backoff,
            timeout=args.timeout,
        )
        answer = check_answer(data)
    except EnlistFailed as exc:
        log.error("enlist failed: %s", exc)
        if not exc.final:
            return EX_TEMPFAIL
        return EX_NOPERM if exc.status in (401, 403) else EX_DATAERR
    except AnswerError as exc:
        log.error("the seed's answer cannot be used: %s", exc)
        return EX_DATAERR
    log.info("enlisted as %s (%s)", answer.node, answer.state)

    run_commands = args.commands == "run" if args.commands else args.root == Path("/")
    try:
        disks = inventory.get("disks", []) if isinstance(inventory, dict) else []
        Applier(args.root, run_commands=run_commands, disks=disks).apply(answer)
    except ApplyError as exc:
        log.error("enlisted, but the answer was not fully applied: %s", exc)
        return EX_SOFTWARE
    except OSError as exc:
        log.error("enlisted, but %s could not be written: %s", exc.filename, exc.strerror)
        return EX_SOFTWARE
    log.info("done: %s is ready for the control plane", answer.hostname)
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
