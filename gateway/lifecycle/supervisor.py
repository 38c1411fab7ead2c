"""The supervisor: the process ``daarion-gateway serve`` starts (PID 1 in the image). It binds
the listening sockets once, runs the workers (``--workers N``, 1 by default) as children that
inherit them, and is the one to signal:

- ``SIGTERM``/``SIGINT``: every worker drains and stops (``Gateway.stop``), then it exits 0.
- ``SIGHUP``: it reads the config file; every worker prepares it (parse, compile) and, only
  when all could, every worker swaps it in; else none does, and it logs why once.
- ``SIGUSR2`` (``daarion-gateway restart``): a new generation, possibly of newer code. The
  supervisor first runs the installed code's ``preflight`` (imports and config check) and
  then replaces its own program with it (``exec``: the same PID, its children and sockets
  kept). The new program starts a new generation of workers on the same sockets; they start
  everything (config, Redis or its fallback, first health probes) without accepting; when all
  say ``ready`` they accept, and only then is the old generation told to hand over (stop
  accepting, answer what its connections send with ``Connection: close``, WebSocket sessions
  until ``ws_drain``, exit). A new generation that fails stops, the old one keeps serving,
  and one line says why.

A worker that dies unasked is started again (after a second, if it lived less than one) with
the config the others serve. The sockets are the supervisor's for as long as it lives: a
connection the kernel completed while no worker accepted waits in its queue, never reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from .. import logs
from ..commands import SIGNALS  # blocked from the command's start (start.py) until run()
from ..config import Config, ConfigError, digest, parse_config
from .channel import Channel, Closed
from .listeners import address, bind, unclaimed

log = logging.getLogger("gateway")

STATE_ENV: Final = "GATEWAY_SUPERVISOR_STATE"  # what a supervisor hands to its exec'd program
# How workers, the preflight and a restart run the installed gateway. -P (Python 3.11's safe
# path): without it "-m" puts the current directory first on sys.path, so a "gateway" folder
# there (a checkout, another release) would be what the workers run, not what is installed.
INSTALLED: Final = (sys.executable, "-P", "-m", "gateway")
RESPAWN_DELAY: Final = 1.0  # before a worker that lived less than a second starts again
START_TIMEOUT: Final = 60.0  # for a worker to say ready (config, Redis, first probes)
ANSWER_TIMEOUT: Final = 30.0  # for a worker to answer a prepare, or to start accepting
PREFLIGHT_TIMEOUT: Final = 60.0
KILL_MARGIN: Final = 15.0  # after a worker's drain, its WebSocket closes and shutdown


class StartFailed(Exception):
    """A worker of a new generation did not start: why."""


@dataclass(slots=True)
class Listening:
    """A listener's sockets: each worker slot has its own (``SO_REUSEPORT`` with several
    workers, so the kernel spreads connections over them), each with one socket per address
    the host resolves to."""

    name: str
    host: str
    port: int  # as asked (0: any)
    slots: list[list[socket.socket]]

    def descriptors(self, index: int) -> list[int]:
        return [sock.fileno() for sock in self.slots[index]]

    def close(self) -> None:
        for sockets in self.slots:
            for sock in sockets:
                sock.close()


@dataclass(slots=True, eq=False)
class Child:
    """One worker process."""

    pid: int
    index: int
    generation: int
    channel: Channel
    end: socket.socket  # the supervisor's end of the channel
    started: float  # time.time()
    exited: asyncio.Future[int] = field(default_factory=asyncio.Future)
    retired: bool = False  # told to stop: its exit is expected


@dataclass(slots=True)
class Options:
    """What ``serve`` was started with."""

    path: str
    workers: int
    host: str | None
    port: int | None
    log_level: str
    pid_file: str | None  # None: pid_file_for()


def pid_file_for(config: Config, port: int | None) -> str:
    """Where a gateway writes its pid: ``lifecycle.pid_file``, else one per plain port in
    the user's runtime directory (``daarion-gateway restart`` looks there)."""
    if config.lifecycle.pid_file is not None:
        return config.lifecycle.pid_file
    port = config.listen.port if port is None else port
    return os.path.join(runtime_dir(), f"gateway-{port}.pid")


def runtime_dir() -> str:
    """``$XDG_RUNTIME_DIR``, else ``daarion-gateway-<uid>`` in the temporary directory: made
    0700 and checked to be this user's own directory (not a link another user planted)."""
    given = os.environ.get("XDG_RUNTIME_DIR")
    if given and os.path.isdir(given):
        return given
    path = os.path.join(tempfile.gettempdir(), f"daarion-gateway-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{path} is not a private directory of this user")
    return path


class Supervisor:
    def __init__(self, options: Options, text: str, config: Config) -> None:
        """``config``: ``text`` parsed (after an exec, the file as it is now, or what the
        previous program served)."""
        self.options = options
        self.text = text  # the config every worker serves (a respawn gets it too)
        self._longest_stop = 0.0  # see grace
        self.config = config
        self.generation = 1
        self.reload_ok = True  # how the last reload ended (a respawned worker says it too)
        self._reloads = 0  # numbers each reload's messages (channel.py: seq)
        self.restarts = 0  # restarts asked for, and how the last one ended (the state file)
        self.last_restart: dict[str, Any] | None = None
        self.children: set[Child] = set()
        self.listening: dict[str, Listening] = {}
        self.run_dir = tempfile.mkdtemp(prefix="daarion-gateway-")
        self.pid_file = ""
        self.busy = asyncio.Lock()  # one reload, restart or respawn at a time
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        # Reloads and restarts asked for and not yet begun (carried across a restart's exec).
        self.queued = {"reload": 0, "restart": 0}
        self.carried: dict[str, int] = {}

    # -- running -----------------------------------------------------------------------------

    async def run(self, resumed: dict[str, Any] | None = None) -> int:
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self._signalled, signum)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # blocked across an exec
        if resumed is not None:
            # A SIGHUP delivered as the signals are unblocked waits until every worker is
            # attached again: it prepared only those attached and committed to all.
            async with self.busy:
                await self._resume(resumed)
            self._later(self._restart_after_exec())
        else:
            try:
                self.listening = self._bind(self.config)
            except OSError as exc:
                log.critical("cannot listen", extra={"fields": self._who(str(exc))})
                shutil.rmtree(self.run_dir, ignore_errors=True)
                return 1
            self._write_pid_file()
            try:
                async with self.busy:  # a SIGHUP or SIGUSR2 meanwhile waits for the start
                    children = await self._start_generation(self.generation, self.text)
            except StartFailed as exc:
                log.critical("gateway could not start", extra={"fields": self._who(str(exc))})
                await self._stop_all()
                return 1
            log.info(
                "workers started",
                extra={
                    "fields": {
                        **self._who(),
                        "workers": len(children),
                        "pids": sorted(c.pid for c in children),
                        "pid_file": self.pid_file,
                    }
                },
            )
        await self.stopping.wait()
        await self._stop_all()
        return 0

    def _signalled(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping.is_set():
                log.info("stopping: every worker drains", extra={"fields": self._who()})
            self.stopping.set()
        elif signum == signal.SIGHUP:
            self.queued["reload"] += 1
            self._later(self._reload())
        elif signum == signal.SIGUSR2:
            self.queued["restart"] += 1
            self._later(self._restart())

    def _later(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _stop_all(self) -> None:
        """SIGTERM to every worker; SIGKILL to those still there after their grace."""
        for task in list(self.tasks):
            task.cancel()
        for listening in self.listening.values():
            listening.close()  # the workers hold theirs while they drain
        for child in self.children:
            child.retired = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        waiting = [child.exited for child in self.children]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=self.grace())
            for child in list(self.children):
                self._kill_if_running(child)
            if late:
                await asyncio.wait(late, timeout=5)
        with contextlib.suppress(OSError):
            if _read(self.pid_file).split()[0] == str(os.getpid()):
                os.unlink(self.pid_file)
        with contextlib.suppress(OSError):
            os.unlink(self.pid_file + ".json")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("workers stopped", extra={"fields": self._who()})

    def _kill_after_grace(self, child: Child) -> None:
        """SIGKILL a worker told to stop that is still there after its grace."""
        asyncio.get_running_loop().call_later(self.grace(), self._kill_if_running, child)

    def _kill_if_running(self, child: Child) -> None:
        if not child.exited.done():
            log.error(
                "worker still running after the grace period; killing it",
                extra={"fields": {**self._who(), "worker": child.index, "pid": child.pid}},
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        lifecycle = config.lifecycle
        stop = lifecycle.drain_delay + lifecycle.ws_drain + lifecycle.shutdown_timeout
        self._longest_stop = max(self._longest_stop, stop)

    def grace(self) -> float:
        """How long a stopping worker may take before it is killed. A worker keeps the
        shutdown_timeout it started with (a change needs a restart), and one of an older
        generation, handing over, drains with its own config's drain_delay and ws_drain: so
        the longest whole stop of the configs this program (and, across a restart's exec,
        the one before it) has served bounds it. A reload or restart to a shorter one killed
        requests and WebSocket sessions still allowed to finish."""
        return self._longest_stop + KILL_MARGIN

    def _who(self, error: str | None = None) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "pid": os.getpid(),
            "worker": None,
            "generation": self.generation,
        }
        if error is not None:
            fields["error"] = error
        return fields

    # -- sockets -----------------------------------------------------------------------------

    def _wanted(self, config: Config) -> dict[str, tuple[str, int]]:
        """Each listener the config has: (host, port); serve's --host and --port for the plain
        one."""
        options = self.options
        wanted = {
            "http": (
                options.host if options.host is not None else config.listen.host,
                options.port if options.port is not None else config.listen.port,
            )
        }
        if config.tls is not None and config.tls.enabled:
            wanted["https"] = (config.tls.listen.host, config.tls.listen.port)
        if config.admin.listen is not None:
            wanted["admin"] = (config.admin.listen.host, config.admin.listen.port)
        return wanted

    def _bind(
        self, config: Config, held: dict[str, Listening] | None = None
    ) -> dict[str, Listening]:
        """The config's listeners: those ``held`` on the same address as they are, the others
        bound (OSError: one could not be, and none is kept)."""
        count = self.options.workers
        made: dict[str, Listening] = {}
        try:
            for name, (host, port) in self._wanted(config).items():
                same = (held or {}).get(name)
                if same is not None and (same.host, same.port) == (host, port):
                    made[name] = same
                    continue
                ours = same is not None and same.port == port  # its own, on another host
                if count > 1 and port != 0 and not ours:
                    unclaimed(host, port)  # (a single socket's bind finds it taken)
                first = bind(host, port, reuse_port=count > 1)
                slots = [first]
                actual = address(first[0])[1]
                slots += [bind(host, actual, reuse_port=True) for _ in range(count - 1)]
                made[name] = Listening(name, host, port, slots)
        except OSError:
            for name, listening in made.items():
                if (held or {}).get(name) is not listening:
                    listening.close()
            raise
        return made

    # -- workers -----------------------------------------------------------------------------

    def _socket_path(self, generation: int, index: int) -> str:
        return os.path.join(self.run_dir, f"g{generation}-w{index}.sock")

    async def _spawn(self, index: int, generation: int, text: str) -> Child:
        """Start a worker and send it its setup; it then starts on its own."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        descriptors = {name: held.descriptors(index) for name, held in self.listening.items()}
        passed = [theirs.fileno(), *(fd for fds in descriptors.values() for fd in fds)]
        argv = [*INSTALLED, "worker", "--control", str(theirs.fileno())]
        argv += ["--log-level", self.options.log_level]
        env = {k: v for k, v in os.environ.items() if k != STATE_ENV}
        sys.stdout.flush()
        for fd in passed:
            os.set_inheritable(fd, True)
        try:
            # posix_spawn returns once the child exists (vfork + exec): no wait on the loop.
            pid = os.posix_spawn(sys.executable, argv, env)  # noqa: ASYNC221
        except OSError:
            ours.close()
            raise
        finally:
            for fd in passed[1:]:
                os.set_inheritable(fd, False)
            theirs.close()
        ours.setblocking(False)
        child = Child(pid, index, generation, await Channel.over(ours), ours, time.time())
        self._watch(child)
        peers = [self._socket_path(generation, i) for i in range(self.options.workers)]
        with contextlib.suppress(Closed):  # it died at once: its exit says so
            await child.channel.send(
                "setup",
                text=text,
                path=self.options.path,
                index=index,
                generation=generation,
                peers=peers,
                listeners=descriptors,
                reload_ok=self.reload_ok,
                supervisor=os.getpid(),
            )
        return child

    def _watch(self, child: Child) -> None:
        """Note the child's exit (a pidfd that turns readable), and start it again when it
        was not asked to stop. Where there is no pidfd (a kernel before Linux 5.3, a Python
        built without the call, a sandbox that refuses it: gVisor, valgrind, an older
        seccomp profile), a thread waits for the exit instead."""
        self.children.add(child)
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(child.pid)
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            waited = loop.run_in_executor(None, os.waitpid, child.pid, 0)
            waited.add_done_callback(lambda done: self._exited(child, done.result()[1]))
            return

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._exited(child, os.waitpid(child.pid, 0)[1])

        loop.add_reader(pidfd, readable)

    def _exited(self, child: Child, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        child.exited.set_result(code)
        child.channel.close()
        self.children.discard(child)
        if not child.retired and not self.stopping.is_set():
            lived = time.time() - child.started
            self._later(self._respawn(child, code, RESPAWN_DELAY if lived < 1 else 0))

    async def _respawn(self, dead: Child, code: int, delay: float) -> None:
        """Start a worker in the place of one that died (after ``delay``)."""
        lived = time.time() - dead.started
        log.error(
            "worker exited; starting another",
            extra={
                "fields": {
                    **self._who(),
                    "worker": dead.index,
                    "pid": dead.pid,
                    "status": code,
                    "lived_s": round(lived, 3),
                }
            },
        )
        await asyncio.sleep(delay)
        async with self.busy:
            if self.stopping.is_set() or dead.generation != self.generation:
                return
            try:
                await self._start_workers([dead.index], self.generation, self.text)
            except StartFailed as exc:
                log.error(  # noqa: TRY400 - the worker logged its own traceback
                    "the replacement worker did not start; trying again",
                    extra={"fields": self._who(str(exc))},
                )
                self._later(self._respawn(dead, -1, RESPAWN_DELAY))

    async def _start_workers(self, indexes: list[int], generation: int, text: str) -> list[Child]:
        """Workers that have started and accept (StartFailed: one did not; those started are
        stopped: at once those that never accepted, as a handover those that did)."""
        started: list[Child] = []
        accepting: list[Child] = []  # told to serve: they may have taken connections
        try:
            for index in indexes:
                started.append(await self._spawn(index, generation, text))
            async with asyncio.timeout(START_TIMEOUT):
                for child in started:
                    await _expect(child, "ready")
            for child in started:
                accepting.append(child)
                await child.channel.send("serve")
            async with asyncio.timeout(ANSWER_TIMEOUT):
                for child in started:
                    await _expect(child, "serving")
        except (StartFailed, Closed, TimeoutError, OSError) as exc:  # OSError: no spawn
            for child in started:
                child.retired = True
                if child in accepting:
                    # A handover's stop: it serves what it took, and puts no SYN filter on
                    # the listening sockets, which the running generation serves too (an
                    # ordinary stop's filter stayed there, dropping their new connections).
                    with contextlib.suppress(Closed):
                        await child.channel.send("handover")
                    self._kill_after_grace(child)
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
            if isinstance(exc, StartFailed):
                raise
            raise StartFailed(
                "a worker did not start in time" if isinstance(exc, TimeoutError) else str(exc)
            ) from exc
        return started

    async def _start_generation(self, generation: int, text: str) -> list[Child]:
        return await self._start_workers(list(range(self.options.workers)), generation, text)

    # -- reload ------------------------------------------------------------------------------

    async def _reload(self) -> None:
        """SIGHUP: every worker serves the file as it is now, or none does."""
        async with self.busy:
            self.queued["reload"] = max(0, self.queued["reload"] - 1)
            path = self.options.path
            try:
                text = _read(path)
            except (OSError, UnicodeDecodeError) as exc:
                problems = [f"cannot read the file: {exc}"]
            else:
                problems = await self._prepare(text)
            serving = self._serving()
            verdict = "abort" if problems else "commit"
            for child in serving:
                with contextlib.suppress(Closed):
                    await child.channel.send(verdict, seq=self._reloads)
            self.reload_ok = not problems
            if problems:
                log.error(
                    "config reload rejected; still serving the previous config",
                    extra={"fields": {"config": path, "problems": problems, **self._who()}},
                )
                return
            self.text = text
            self.config = parse_config(text, path)
            log.info(
                "config reloaded by every worker",
                extra={"fields": {"config": path, "hash": digest(text), **self._who()}},
            )

    def _serving(self) -> list[Child]:
        return [c for c in self.children if c.generation == self.generation and not c.retired]

    async def _prepare(self, text: str) -> list[str]:
        """Every serving worker's problems with ``text`` (none: all can serve it)."""
        try:
            parse_config(text, self.options.path)
        except ConfigError as exc:  # said once here rather than once per worker
            return [str(p) for p in exc.problems]
        self._reloads += 1
        seq = self._reloads
        problems: list[str] = []
        for child in self._serving():
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    await child.channel.send("prepare", text=text, seq=seq)
                    answer = await _expect(child, "prepared")
                    # A late answer to an earlier reload is skipped (one with no number is
                    # from a worker of code before numbers, after a failed upgrade: taken).
                    while answer.get("seq", seq) != seq:
                        answer = await _expect(child, "prepared")
            except (Closed, TimeoutError, StartFailed) as exc:
                problems.append(f"worker {child.index} did not answer: {exc!r}")
                continue
            problems += [p for p in answer["problems"] if p not in problems]
        return problems

    # -- restart -----------------------------------------------------------------------------

    async def _restart(self) -> None:
        """SIGUSR2: check the installed code and the config with it, then become it."""
        async with self.busy:
            self.queued["restart"] = max(0, self.queued["restart"] - 1)
            self.restarts += 1
            self._write_state()
            command = [*INSTALLED, "preflight", "--config", self.options.path]
            log.info("restart: checking the installed code and the config",
                     extra={"fields": self._who()})  # fmt: skip
            try:
                checked = await asyncio.create_subprocess_exec(
                    *command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
            except OSError as exc:
                self._restart_failed(f"preflight did not run: {exc}", [])
                return
            try:
                async with asyncio.timeout(PREFLIGHT_TIMEOUT):
                    _, errors = await checked.communicate()
            except TimeoutError:
                checked.kill()
                await checked.wait()
                self._restart_failed(f"preflight took more than {PREFLIGHT_TIMEOUT:g} s", [])
                return
            if checked.returncode != 0:
                lines = errors.decode(errors="replace").strip().splitlines()
                self._restart_failed("the new code or config did not pass preflight", lines[-30:])
                return
            # Signals wait (blocked; the mask is kept across exec) until the new program has
            # its handlers. Those delivered already run first: a stop asked for meanwhile
            # is done by this program, not lost in the exec.
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            for _ in range(3):
                await asyncio.sleep(0)
            if self.stopping.is_set():
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
                return
            self._exec()

    def _exec(self) -> None:
        """Replace this program with the installed one, handing it the state (in a file of
        the private run directory: a config may be larger than an environment string)."""
        state = {
            "options": {
                "path": self.options.path,
                "workers": self.options.workers,
                "host": self.options.host,
                "port": self.options.port,
                "log_level": self.options.log_level,
                "pid_file": self.options.pid_file,
            },
            "text": self.text,
            "generation": self.generation,
            "restarts": self.restarts,
            "reload_ok": self.reload_ok,
            "run_dir": self.run_dir,
            "pid_file": self.pid_file,
            "listening": [_listening_state(held) for held in self.listening.values()],
            "children": [_child_state(child) for child in self.children],
            "queued": self.queued,  # signals whose work waited for this restart
            "longest_stop": self._longest_stop,  # the grace of the workers handed on
            "reloads": self._reloads,  # a late answer to one before is still told apart
        }
        handed = [sock.fileno() for held in self.listening.values() for slot in held.slots
                  for sock in slot] + [child.end.fileno() for child in self.children]  # fmt: skip
        log.info("restart: starting the installed code", extra={"fields": self._who()})
        logs.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        state_file = os.path.join(self.run_dir, "handover.json")
        argv = [*INSTALLED, "serve", "--config", self.options.path]
        argv += ["--workers", str(self.options.workers), "--log-level", self.options.log_level]
        try:
            _replace(state_file, orjson.dumps(state).decode())
            for fd in handed:
                os.set_inheritable(fd, True)
            os.execve(sys.executable, argv, {**os.environ, STATE_ENV: state_file})  # noqa: S606 - the same interpreter, no shell
        except OSError as exc:  # this program goes on, its descriptors its own again
            for fd in handed:
                os.set_inheritable(fd, False)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            self._restart_failed(f"cannot start the installed code: {exc}", [])

    async def _resume(self, state: dict[str, Any]) -> None:
        """The state an exec handed over: sockets, workers, the config they serve."""
        self.text = state["text"]
        self.generation = state["generation"]
        self.restarts = state["restarts"]
        self.reload_ok = state["reload_ok"]
        self.carried = state.get("queued", {})  # asked for during the restart: done after it
        self._longest_stop = max(self._longest_stop, state.get("longest_stop", 0.0))
        self._reloads = state.get("reloads", 0)
        shutil.rmtree(self.run_dir, ignore_errors=True)  # the one made in __init__
        self.run_dir = state["run_dir"]
        self.pid_file = state["pid_file"]
        for item in state["listening"]:
            slots = [[socket.socket(fileno=fd) for fd in slot] for slot in item["slots"]]
            for slot in slots:
                for sock in slot:
                    os.set_inheritable(sock.fileno(), False)
            self.listening[item["name"]] = Listening(
                item["name"], item["host"], item["port"], slots
            )
        for item in state["children"]:
            end = socket.socket(fileno=item["end"])
            os.set_inheritable(end.fileno(), False)
            end.setblocking(False)
            child = Child(
                item["pid"], item["index"], item["generation"],
                await Channel.over(end), end, item["started"], retired=item["retired"],
            )  # fmt: skip
            self._watch(child)
            if child.retired:  # its kill timer was the previous program's
                self._kill_after_grace(child)

    async def _restart_after_exec(self) -> None:
        """The new program's half of a restart: a new generation, then the old one's
        handover; or, when it cannot start, the old one goes on. Then what was asked for
        while the previous program restarted (a reload, another restart)."""
        try:
            await self._restart_in_new_program()
        finally:
            if self.carried.get("reload"):
                self._signalled(signal.SIGHUP)
            if self.carried.get("restart"):
                self._signalled(signal.SIGUSR2)
            self.carried = {}

    async def _restart_in_new_program(self) -> None:
        async with self.busy:
            path = self.options.path
            try:
                text = _read(path)
                config = parse_config(text, path)
            except (OSError, UnicodeDecodeError) as exc:
                await self._failed_after_exec(f"cannot read the config: {exc}", [])
                return
            except ConfigError as exc:
                await self._failed_after_exec("config invalid", [str(p) for p in exc.problems])
                return
            try:
                listening = self._bind(config, self.listening)
            except OSError as exc:
                await self._failed_after_exec(f"cannot listen: {exc}", [])
                return
            previous, self.listening = self.listening, listening
            old = self._serving()
            generation = self.generation + 1
            try:
                new = await self._start_generation(generation, text)
            except StartFailed as exc:
                for name, sockets in listening.items():
                    if previous.get(name) is not sockets:
                        sockets.close()
                self.listening = previous
                await self._failed_after_exec(str(exc), [])
                return
            self.generation, self.text, self.config = generation, text, config
            for child in old:
                child.retired = True
                with contextlib.suppress(Closed):
                    await child.channel.send("handover")
                self._kill_after_grace(child)
            for name, sockets in previous.items():
                if listening.get(name) is not sockets:
                    sockets.close()  # changed: the old generation's last copies go with it
            self.last_restart = {"n": self.restarts, "ok": True, "generation": generation}
            self._move_pid_file()
            self._write_state()
            log.info(
                "restarted: the new generation accepts, the old one hands over",
                extra={
                    "fields": {
                        **self._who(),
                        "pids": sorted(c.pid for c in new),
                        "handing_over": sorted(c.pid for c in old),
                        "hash": digest(text),
                    }
                },
            )

    async def _fill(self) -> None:
        """Start a worker in every slot of the serving generation that has none (one that
        died while a restart replaced this program: its respawn was the old program's). The
        caller holds ``busy``."""
        live = {c.index for c in self._serving()}
        missing = [i for i in range(self.options.workers) if i not in live]
        if not missing or self.stopping.is_set():
            return
        try:
            await self._start_workers(missing, self.generation, self.text)
        except StartFailed as exc:
            log.error(  # noqa: TRY400 - the worker logged its own traceback
                "a missing worker did not start; trying again",
                extra={"fields": self._who(str(exc))},
            )
            self._later(self._fill_later())

    async def _fill_later(self) -> None:
        await asyncio.sleep(RESPAWN_DELAY)
        async with self.busy:
            await self._fill()

    async def _failed_after_exec(self, error: str, problems: list[str]) -> None:
        """A restart that failed in the new program: the old generation serves on, with
        every slot filled, and this program's view of its config is the one it serves."""
        self._restart_failed(error, problems)
        with contextlib.suppress(ConfigError):
            self.config = parse_config(self.text, self.options.path)
        await self._fill()

    def _restart_failed(self, error: str, problems: list[str]) -> None:
        self.last_restart = {"n": self.restarts, "ok": False, "error": error, "problems": problems}
        self._write_state()
        log.error(
            "restart failed; the running generation keeps serving",
            extra={"fields": {**self._who(error), "problems": problems}},
        )

    # -- the pid file ------------------------------------------------------------------------

    def _write_pid_file(self) -> None:
        """The pid (``restart`` signals it) and, beside it, the state as JSON."""
        chosen = self.options.pid_file
        try:
            if chosen is None:
                port = address(self.listening["http"].slots[0][0])[1]
                chosen = pid_file_for(self.config, port)
            self.pid_file = chosen
            _replace(chosen, f"{os.getpid()}\n")
        except OSError as exc:
            log.warning("cannot write the pid file; restart needs the pid",
                        extra={"fields": {**self._who(str(exc)), "pid_file": chosen}})  # fmt: skip
        self._write_state()

    def _move_pid_file(self) -> None:
        """After a restart: the pid file where the config (a new port, a new pid_file) says
        restart will look for it now."""
        before = self.pid_file
        self._write_pid_file()
        if before and before != self.pid_file:
            for stale in (before, before + ".json"):
                with contextlib.suppress(OSError):
                    os.unlink(stale)

    def _write_state(self) -> None:
        if not self.pid_file:
            return
        state = {
            "pid": os.getpid(),
            "generation": self.generation,
            "restarts": self.restarts,
            "last_restart": self.last_restart,
            "listening": {
                name: [":".join(map(str, address(sock))) for sock in held.slots[0]]
                for name, held in self.listening.items()
            },
        }
        with contextlib.suppress(OSError):
            _replace(self.pid_file + ".json", orjson.dumps(state).decode())


async def _expect(child: Child, op: str) -> dict[str, Any]:
    """The child's next message, which should be ``op``."""
    receiving = asyncio.ensure_future(child.channel.receive())
    try:
        done, _ = await asyncio.wait((receiving, child.exited), return_when=asyncio.FIRST_COMPLETED)
    finally:  # a timeout around the call, too: no read may be left waiting on the channel
        if not receiving.done():
            receiving.cancel()
    if receiving not in done:
        raise StartFailed(f"worker {child.index} exited with status {child.exited.result()}")
    try:
        message = receiving.result()
    except Closed:
        code = await child.exited
        raise StartFailed(f"worker {child.index} exited with status {code}") from None
    if message["op"] == "failed":
        problems = message.get("problems") or []
        raise StartFailed(message["error"] + "".join(f"; {p}" for p in problems))
    if message["op"] != op:
        raise StartFailed(f"worker {child.index} said {message['op']}, not {op}")
    return message


def _listening_state(held: Listening) -> dict[str, Any]:
    slots = [[sock.fileno() for sock in slot] for slot in held.slots]
    return {"name": held.name, "host": held.host, "port": held.port, "slots": slots}


def _child_state(child: Child) -> dict[str, Any]:
    return {
        "pid": child.pid,
        "index": child.index,
        "generation": child.generation,
        "end": child.end.fileno(),
        "started": child.started,
        "retired": child.retired,
    }


def _read(path: str) -> str:
    """A config file's text (small: read on the supervisor's loop, which serves nothing)."""
    with open(path, encoding="utf-8") as file:
        return file.read()


def _replace(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole (a reader never sees half of it), through a new file
    of its own (O_EXCL: no link is followed) renamed over it."""
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".gateway-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def handed_over() -> dict[str, Any] | None:
    """The state a restart's exec handed to this program (None at a plain start)."""
    path = os.environ.pop(STATE_ENV, None)
    if not path:
        return None
    with open(path, "rb") as file:
        state: dict[str, Any] = orjson.loads(file.read())
    os.unlink(path)
    return state


def run(options: Options, text: str, config: Config, resumed: dict[str, Any] | None) -> int:
    """``serve``: supervise until SIGTERM or SIGINT; the exit status."""
    return asyncio.run(Supervisor(options, text, config).run(resumed))
