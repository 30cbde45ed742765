"""A pure interpreter of the iPXE script subset metalseed emits (``pxe/*.ipxe.j2``).

Lab machines that do not run the real iPXE (the netns and fake kinds) run
their boot scripts here. Every effect -- downloads, sleeps, output, booting,
powering off -- goes through an injected ``Actions`` object, so the unit tests
drive every expected script with fakes and the firmware emulator drives the
real thing.

The language, as iPXE has it (``core/exec.c``, ``core/parseopt.c``):

* ``#!ipxe`` first; lines starting with ``#`` are comments; ``:label`` lines
  are labels; blank lines are skipped;
* a line is split into words on whitespace, with ``"..."``/``'...'`` quoting
  and ``\\`` escapes; ``||`` and ``&&`` separate commands, evaluated left to
  right with no precedence (``a || b``: b runs only if a failed);
* settings expand inside words: ``${uuid}``, ``${mac}``, ``${ip}``, and the
  same with an ``net0/`` or ``netX/`` scope, optionally typed ``:hexhyp``
  (``52-54-00-...``) or ``:hex`` (``52:54:00:...``);
* commands: ``echo [-n]``, ``kernel [--name N] URL ARGS...``, ``initrd
  [--name N] URL``, ``boot``, ``chain [--replace] [--autofree] URL``,
  ``sleep N``, ``goto LABEL``, ``poweroff``, ``exit [N]``.

Unlike iPXE, which expands an unknown setting to "" and reports an unknown
command only when it reaches it, both are errors here, and every command
name and option is checked when the script is parsed: a template change that
the lab machines would not understand fails loudly. A command that fails
(``CommandFailed`` from an action) is handled by ``||``; a failure nothing
handles ends the script (``ScriptFailed``). Two guards stop runaway scripts:
more than ``max_chains`` chains, or more than ``max_steps`` commands.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ..errors import FatalError

MAX_CHAINS = 16
MAX_STEPS = 10_000


class IpxeError(FatalError):
    """The script cannot be run: not iPXE, a syntax error, an unknown command or setting."""


class ScriptFailed(IpxeError):
    """A command failed and nothing in the script handled it (no ``||``)."""


class NotAScript(IpxeError):
    """The text has no ``#!ipxe`` line (iPXE: "Exec format error")."""


class LoopGuard(IpxeError):
    """The script chained or stepped more than the guard allows without booting."""


class CommandFailed(Exception):
    """Raised by an action: the command fails, and ``||`` in the script may handle it."""


class Actions(Protocol):
    """What the interpreter asks of the machine it runs on."""

    def fetch(self, url: str, name: str) -> Any:
        """Download a kernel or initrd; a handle for ``boot``. ``CommandFailed`` if it fails."""

    def fetch_script(self, url: str) -> str:
        """Download a script to chain to. ``CommandFailed`` if it fails."""

    def sleep(self, seconds: float) -> None: ...

    def echo(self, text: str) -> None: ...

    def boot(self, kernel: Image, initrds: Sequence[Image], cmdline: str) -> None:
        """Boot: return when booted; ``CommandFailed`` when it cannot."""

    def poweroff(self) -> None:
        """Power off: return when done; ``CommandFailed`` where unsupported."""


@dataclasses.dataclass(frozen=True)
class Image:
    """A downloaded image: its iPXE name, URL, command line and the action's handle."""

    name: str
    url: str
    cmdline: str = ""
    handle: Any = dataclasses.field(default=None, compare=False)


class Status(enum.StrEnum):
    BOOTED = "booted"
    EXITED = "exited"
    POWEROFF = "poweroff"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a script run ended."""

    status: Status
    kernel: Image | None = None
    initrds: tuple[Image, ...] = ()
    cmdline: str = ""
    exit_code: int = 0
    chains: int = 0
    steps: int = 0
    failures: tuple[str, ...] = ()  # commands that failed and were handled, in order


# -- parsing -----------------------------------------------------------------------------------

#: command -> (options taking a value, flag options); short forms map to long ones
_COMMANDS: Mapping[str, tuple[frozenset[str], frozenset[str]]] = {
    "echo": (frozenset(), frozenset({"n"})),
    "kernel": (frozenset({"name"}), frozenset({"autofree", "replace"})),
    "initrd": (frozenset({"name"}), frozenset({"autofree"})),
    "boot": (frozenset(), frozenset({"autofree", "replace"})),
    "chain": (frozenset({"name"}), frozenset({"autofree", "replace"})),
    "sleep": (frozenset(), frozenset()),
    "goto": (frozenset(), frozenset()),
    "poweroff": (frozenset(), frozenset()),
    "exit": (frozenset(), frozenset()),
}
#: short options, per command (``echo -n`` is not ``kernel -n NAME``)
_SHORT: Mapping[str, Mapping[str, str]] = {
    "echo": {"n": "n"},
    "kernel": {"n": "name", "a": "autofree", "r": "replace"},
    "initrd": {"n": "name", "a": "autofree"},
    "boot": {"a": "autofree", "r": "replace"},
    "chain": {"n": "name", "a": "autofree", "r": "replace"},
}
_ARITY = {  # (min, max) positional arguments; None: unbounded
    "echo": (0, None),
    "kernel": (1, None),
    "initrd": (1, 1),
    "boot": (0, 0),
    "chain": (1, None),
    "sleep": (1, 1),
    "goto": (1, 1),
    "poweroff": (0, 0),
    "exit": (0, 1),
}
_LABEL = re.compile(r"^:([A-Za-z0-9_.-]+)\s*$")
_SETTING = re.compile(r"\$\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    options: Mapping[str, str | bool]
    args: tuple[str, ...]  # unexpanded words


@dataclasses.dataclass(frozen=True)
class Line:
    number: int
    text: str
    #: commands joined by the operator *before* each (None for the first)
    steps: tuple[tuple[str | None, Command], ...]


@dataclasses.dataclass(frozen=True)
class Program:
    source: str
    lines: tuple[Line, ...]
    labels: Mapping[str, int]  # label -> index into lines of the first line after it


def split_words(text: str, where: str = "") -> list[str]:
    """A command line -> words: whitespace-separated, with quotes and backslash escapes."""
    words: list[str] = []
    current: list[str] = []
    started = False
    quote = ""
    chars = iter(text)
    for ch in chars:
        if quote:
            if ch == quote:
                quote = ""
            elif ch == "\\" and quote == '"':
                current.append(next(chars, "\\"))
            else:
                current.append(ch)
        elif ch in "\"'":
            quote, started = ch, True
        elif ch == "\\":
            current.append(next(chars, "\\"))
            started = True
        elif ch.isspace():
            if started:
                words.append("".join(current))
                current, started = [], False
        else:
            current.append(ch)
            started = True
    if quote:
        raise IpxeError(f"{where}unterminated {quote} quote")
    if started:
        words.append("".join(current))
    return words


def _command(words: list[str], where: str) -> Command:
    name, rest = words[0], words[1:]
    if name not in _COMMANDS:
        raise IpxeError(f"{where}unknown command {name!r}")
    valued, flags = _COMMANDS[name]
    options: dict[str, str | bool] = {}
    while rest and rest[0].startswith("-") and rest[0] != "-":
        word = rest.pop(0)
        if word == "--":
            break
        key, eq, value = word.lstrip("-").partition("=")
        if not word.startswith("--"):
            key = _SHORT.get(name, {}).get(key, "-" + key)
        if key in valued:
            if not eq:
                if not rest:
                    raise IpxeError(f"{where}{name}: option --{key} needs a value")
                value = rest.pop(0)
            options[key] = value
        elif key in flags and not eq:
            options[key] = True
        else:
            raise IpxeError(f"{where}{name}: unknown option {word!r}")
    low, high = _ARITY[name]
    if len(rest) < low or (high is not None and len(rest) > high):
        raise IpxeError(f"{where}{name}: wrong number of arguments ({len(rest)})")
    if name in ("sleep", "exit") and rest and not rest[0].isdigit():
        raise IpxeError(f"{where}{name}: {rest[0]!r} is not a number")
    return Command(name, options, tuple(rest))


def parse(text: str, source: str = "script") -> Program:
    """A script -> ``Program``; ``IpxeError`` for anything this interpreter cannot run."""
    raw_lines = text.splitlines()
    if not raw_lines or raw_lines[0].strip() not in ("#!ipxe", "#!gpxe"):
        raise NotAScript(f"{source}: not an iPXE script (no #!ipxe line)")
    lines: list[Line] = []
    labels: dict[str, int] = {}
    for number, raw in enumerate(raw_lines[1:], start=2):
        stripped = raw.strip()
        where = f"{source} line {number}: "
        if not stripped or stripped.startswith("#"):
            continue
        label = _LABEL.match(stripped)
        if label:
            labels.setdefault(label.group(1), len(lines))
            continue
        if stripped.startswith(":"):
            raise IpxeError(f"{where}bad label {stripped!r}")
        steps: list[tuple[str | None, Command]] = []
        op: str | None = None
        words: list[str] = []
        for word in [*split_words(stripped, where), "&&"]:
            if word in ("||", "&&"):
                if not words:
                    raise IpxeError(f"{where}{word} without a command before it")
                steps.append((op, _command(words, where)))
                op, words = word, []
            else:
                words.append(word)
        lines.append(Line(number, stripped, tuple(steps)))
    for line in lines:
        for _, command in line.steps:
            if command.name == "goto" and command.args[0] not in labels:
                raise IpxeError(f"{source} line {line.number}: no label {command.args[0]!r}")
    return Program(source, tuple(lines), labels)


# -- settings ----------------------------------------------------------------------------------


def _format(name: str, value: str, kind: str) -> str:
    if not kind or kind == "string":
        return value
    if kind in ("hexhyp", "hex"):
        digits = value.replace(":", "").replace("-", "").lower()
        if len(digits) % 2 or not re.fullmatch(r"[0-9a-f]*", digits):
            raise IpxeError(f"setting {name} ({value!r}) cannot be shown as {kind}")
        sep = "-" if kind == "hexhyp" else ":"
        return sep.join(digits[i : i + 2] for i in range(0, len(digits), 2))
    raise IpxeError(f"unknown setting type {kind!r} in ${{{name}:{kind}}}")


def expand(word: str, settings: Mapping[str, str]) -> str:
    """``${[net0/|netX/]NAME[:TYPE]}`` -> its value; unknown settings are errors."""

    def one(match: re.Match) -> str:
        spec = match.group(1)
        name, _, kind = spec.partition(":")
        base = name
        scope, slash, rest = name.partition("/")
        if slash:
            if scope not in ("net0", "netX"):
                raise IpxeError(f"unknown setting scope {scope!r} in ${{{spec}}}")
            base = rest
        if base not in settings:
            raise IpxeError(f"unknown setting ${{{spec}}}")
        return _format(name, settings[base], kind)

    return _SETTING.sub(one, word)


# -- running -----------------------------------------------------------------------------------


class _Stop(Exception):
    """Unwinds nested chains when a script boots, exits the firmware or powers off."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


class _Replace(Exception):
    def __init__(self, program: Program) -> None:
        self.program = program


class Interpreter:
    """Runs scripts against ``actions`` with the machine's ``settings`` (uuid, mac, ip)."""

    def __init__(
        self,
        actions: Actions,
        settings: Mapping[str, str],
        *,
        max_chains: int = MAX_CHAINS,
        max_steps: int = MAX_STEPS,
    ) -> None:
        self.actions = actions
        self.settings = dict(settings)
        self.max_chains = max_chains
        self.max_steps = max_steps
        self.chains = 0
        self.steps = 0
        self.failures: list[str] = []
        self._images: dict[str, Image] = {}
        self._kernel: str | None = None

    def run(self, text: str, source: str = "script") -> Outcome:
        """Run a script to its end: booted, exited or powered off (or an ``IpxeError``)."""
        return self._top(parse(text, source))

    def run_url(self, url: str) -> Outcome:
        """What iPXE does with a script URL from DHCP: fetch it, run it."""
        return self._top(self._fetch_program(url))

    def _top(self, program: Program) -> Outcome:
        try:
            status, code = self._execute(program)
        except _Stop as stop:
            return stop.outcome
        return self._outcome(status, code)

    def _outcome(self, status: Status, code: int = 0) -> Outcome:
        kernel = self._images.get(self._kernel) if self._kernel else None
        return Outcome(
            status,
            kernel,
            self._initrds(),
            kernel.cmdline if kernel else "",
            code,
            self.chains,
            self.steps,
            tuple(self.failures),
        )

    def _initrds(self) -> tuple[Image, ...]:
        return tuple(i for name, i in self._images.items() if name != self._kernel)

    def _fetch_program(self, url: str) -> Program:
        return parse(self.actions.fetch_script(url), url)

    def _execute(self, program: Program) -> tuple[Status, int]:
        """Run ``program`` (following ``chain --replace``) until it ends or exits."""
        while True:
            try:
                return self._run_lines(program)
            except _Replace as replace:
                program = replace.program

    def _run_lines(self, program: Program) -> tuple[Status, int]:
        pc = 0
        while pc < len(program.lines):
            line = program.lines[pc]
            pc += 1
            ok = True
            jump: int | None = None
            for op, command in line.steps:
                if (op == "||" and ok) or (op == "&&" and not ok):
                    continue
                where = f"{program.source} line {line.number}"
                ok, jump, end = self._step(program, command, where)
                if end is not None:
                    return end
                if jump is not None:
                    break
            if jump is not None:
                pc = jump
            elif not ok:
                raise ScriptFailed(f"{self.failures[-1]} (not handled by the script)")
        return Status.EXITED, 0

    def _step(
        self, program: Program, command: Command, where: str
    ) -> tuple[bool, int | None, tuple[Status, int] | None]:
        """One command: (succeeded, goto target, end of script)."""
        self.steps += 1
        if self.steps > self.max_steps:
            raise LoopGuard(f"{where}: more than {self.max_steps} commands without booting")
        args = [expand(a, self.settings) for a in command.args]
        opts = {
            k: expand(v, self.settings) if isinstance(v, str) else v
            for k, v in command.options.items()
        }
        handler: Callable = getattr(self, f"_cmd_{command.name}")
        try:
            result = handler(args, opts)
        except CommandFailed as exc:
            self.failures.append(f"{where}: {command.name}: {exc}")
            return False, None, None
        if command.name == "goto":
            return True, program.labels[args[0]], None
        if command.name == "exit":
            return True, None, (Status.EXITED, result)
        return True, None, None

    # -- the commands --------------------------------------------------------------------------

    def _cmd_echo(self, args: list[str], opts: dict) -> None:
        self.actions.echo(" ".join(args))

    def _cmd_sleep(self, args: list[str], opts: dict) -> None:
        self.actions.sleep(float(args[0]))

    def _cmd_goto(self, args: list[str], opts: dict) -> None:
        return None

    def _cmd_exit(self, args: list[str], opts: dict) -> int:
        return int(args[0]) if args else 0

    def _fetch(self, url: str, name: str | None, cmdline: str = "") -> Image:
        name = name or _basename(url)
        handle = self.actions.fetch(url, name)
        image = Image(name, url, cmdline, handle)
        self._images.pop(name, None)  # iPXE: a new image replaces one of the same name
        self._images[name] = image
        return image

    def _cmd_kernel(self, args: list[str], opts: dict) -> None:
        image = self._fetch(args[0], opts.get("name"), " ".join(args[1:]))
        self._kernel = image.name

    def _cmd_initrd(self, args: list[str], opts: dict) -> None:
        self._fetch(args[0], opts.get("name"))

    def _cmd_boot(self, args: list[str], opts: dict) -> None:
        kernel = self._images.get(self._kernel) if self._kernel else None
        if kernel is None:
            raise CommandFailed("no kernel selected (use kernel first)")
        self.actions.boot(kernel, self._initrds(), kernel.cmdline)
        raise _Stop(self._outcome(Status.BOOTED))

    def _cmd_poweroff(self, args: list[str], opts: dict) -> None:
        self.actions.poweroff()
        raise _Stop(self._outcome(Status.POWEROFF))

    def _cmd_chain(self, args: list[str], opts: dict) -> None:
        self.chains += 1
        if self.chains > self.max_chains:
            raise LoopGuard(
                f"chained {self.chains - 1} times without booting; giving up"
                + (f" (last failure: {self.failures[-1]})" if self.failures else "")
            )
        try:
            program = self._fetch_program(args[0])
        except NotAScript as exc:  # a binary image: this interpreter runs scripts only
            raise CommandFailed(str(exc)) from None
        if opts.get("replace"):
            raise _Replace(program)
        status, code = self._execute(program)
        if code:
            raise CommandFailed(f"chained script exited with status {code}")


def _basename(url: str) -> str:
    path = urllib.parse.urlsplit(url).path
    return path.rstrip("/").rsplit("/", 1)[-1] or url
