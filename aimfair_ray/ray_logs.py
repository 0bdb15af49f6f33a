"""Where Ray's own output goes. After ``route(log_dir, echo)`` (every command, unless ``aimfair --verbose``)
it goes to the run's ``logs/`` folder instead of the console:

- ``workers.log``: what Ray's workers and actors print (Ray Train's reports and checkpoints, the diffusion
  actors' loading bars), each line prefixed with its actor or task and pid;
- ``driver.log``: the driver's Ray, Ray Data, Ray Train and Ray Tune loggers, Python warnings and, in a
  command-line process, anything else written to stderr (Ray's C++ core logs there).

The console keeps the project's lines: a worker line tagged ``[aimfair]`` is echoed (an epoch; it also moves
the epochs bar), and a worker or raylet line about memory or a killed process, and Ray's own errors, are
echoed as warnings. Without ``route`` (a library user, ``--verbose``) Ray prints as it always does."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable, Optional

from aimfair_ray import progress

TAG = "[aimfair]"
# Lines from workers and the raylet that a user must see even when Ray is quiet.
ALARM = re.compile(r"out of memory|OutOfMemory|low on memory|was killed|SIGKILL", re.I)
EPOCH = re.compile(r"^(.*?)\s+(epoch|step) (\d+)/(\d+)")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_state: dict = {"dir": None, "echo": None, "file": None, "workers": None, "store": None}
LOGS = ("workers.log", "driver.log")


def log_dir() -> Optional[str]:
    """The folder Ray's output goes to now (None: the console): on an object store, the store's folder."""
    return _state["store"] or _state["dir"]


def sync() -> None:
    """A run on an object store: this process's logs, as they are now, to the run's ``logs/`` there (the
    stages call it as each ends; a command, at its end)."""
    from aimfair_ray.storage import atomic_write_bytes

    if _state["store"] is None:
        return
    for name in LOGS:
        path = os.path.join(_state["dir"], name)
        if os.path.isfile(path):
            atomic_write_bytes(f"{_state['store']}/{name}", open(path, "rb").read())


def say(text: str) -> None:
    """Show a line on the console of a routed run."""
    if _state["echo"] is not None:
        _state["echo"](text)


def route(directory: str, echo: Callable[[str], None]) -> None:
    """From now on, Ray's output in this process goes to ``directory``; ``echo(line)`` shows the lines a
    user must see. A second call (another run in the same process) moves it to the new folder. A folder on an
    object store is written on this node (:func:`storage.work_dir`, starting from the logs the store holds)
    and copied there by :func:`sync`."""
    from aimfair_ray.storage import exists, is_uri, read_bytes, work_dir

    store = directory.rstrip("/") if is_uri(directory) else None
    directory = work_dir(directory)
    os.makedirs(directory, exist_ok=True)
    if _state["dir"] == directory:
        _state["echo"] = echo
        return
    _close()
    for name in LOGS if store else ():  # an earlier command's logs of this run, from the store
        if exists(f"{store}/{name}"):
            open(os.path.join(directory, name), "wb").write(read_bytes(f"{store}/{name}"))
    _state.update(dir=directory, store=store, echo=echo, workers=open(f"{directory}/workers.log", "a", buffering=1))
    handler = logging.FileHandler(f"{directory}/driver.log")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)  # Ray Data's debug lines stay in Ray's own session logs
    _state["file"] = handler
    _quiet_loggers(handler)
    _redirect_stderr(f"{directory}/driver.log")
    attach_workers()


def attach_workers() -> None:
    """Send worker output to the run's ``workers.log`` (once Ray is connected; ``ensure_ray`` calls it)."""
    if _state["dir"] is None:
        return
    try:
        import ray
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if not ray.is_initialized():
        return
    dispatcher.remove_handler("ray_print_logs")  # Ray's own printer (log_to_driver)
    dispatcher.remove_handler("aimfair_logs")
    dispatcher.add_handler("aimfair_logs", _worker_lines)
    _route_error_channel()


def _route_error_channel() -> None:
    """Ray's error channel (raylet warnings sent to every driver, such as "N worker processes have been
    started") prints with ``ray._private.worker.print_to_stdstream`` itself, not through the dispatcher:
    route it the same way while a run is routed."""
    try:
        import ray._private.worker as rw
    except ImportError:
        return
    original = getattr(rw.print_to_stdstream, "_aimfair_original", rw.print_to_stdstream)

    def routed(data, ignore_prefix=False):
        if _state["dir"] is None:
            return original(data, ignore_prefix)
        _worker_lines(data)

    routed._aimfair_original = original
    rw.print_to_stdstream = routed


def _worker_lines(data: dict) -> None:
    """One batch of a worker's lines (Ray's log monitor): all to workers.log, some to the console."""
    who = data.get("actor_name") or data.get("task_name") or ("raylet" if data.get("pid") == "raylet" else "worker")
    f, echo = _state["workers"], _state["echo"]
    for line in data.get("lines", []):
        if f is not None:
            f.write(f"({who} pid={data.get('pid')}) {line}\n")
        if echo is None:
            continue
        if TAG in line:
            text = line.split(TAG, 1)[1].strip()
            m = EPOCH.match(text)
            if m:
                progress.update(f"{m.group(1)}: {m.group(2)}s", int(m.group(3)), int(m.group(4)))
                if "/trials/" in m.group(1):  # a sweep's trials: the trials bar and table say it, not every epoch
                    continue
            echo(text)
        elif ALARM.search(line):
            echo(f"warning from Ray ({who}): {line.strip()}")


class _Echo(logging.Handler):
    """Ray's errors on the driver, shown on the console (they also go to driver.log)."""

    _aimfair = True

    def emit(self, record: logging.LogRecord) -> None:
        echo = _state["echo"]
        if echo is not None:
            echo(f"Ray {record.levelname.lower()} ({record.name}): {record.getMessage().splitlines()[0]}")


def _ray_loggers() -> list[logging.Logger]:
    """'ray' and the Ray loggers that do not pass records up to it (Ray Data's, Serve's...)."""
    names = [n for n, lg in logging.root.manager.loggerDict.items()
             if isinstance(lg, logging.Logger) and n.startswith("ray.") and not lg.propagate]
    return [logging.getLogger("ray")] + [logging.getLogger(n) for n in sorted(names)]


def _quiet_loggers(handler: logging.Handler) -> None:
    """Ray's console handlers silenced; the run's file (INFO and up) and the error echo added; Python warnings
    (Ray's deprecations, torch's) to the file."""
    import ray  # noqa: F401 - Ray sets up its loggers on import
    import ray.data  # noqa: F401 - and Ray Data its own

    handler._aimfair = True  # ours: replaced when a second run routes elsewhere
    for lg in _ray_loggers() + [logging.getLogger("py.warnings")]:
        for h in list(lg.handlers):
            if getattr(h, "_aimfair", False):
                lg.removeHandler(h)
            elif isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.CRITICAL + 1)
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
        if lg.name != "py.warnings":
            lg.addHandler(_Echo(logging.ERROR))
    logging.getLogger("py.warnings").propagate = False
    logging.captureWarnings(True)


def _redirect_stderr(path: str) -> None:
    """In a command-line process, file descriptor 2 to ``path``: what Ray's C++ core and native libraries print
    there (not reachable from Python) lands in the log. Skipped where stderr is not the process's own (a test's
    captured stream), so nothing outside the command is touched."""
    try:
        if sys.stderr is not sys.__stderr__ or sys.stderr.fileno() != 2:
            return
    except (AttributeError, ValueError, OSError):
        return
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def _close() -> None:
    if _state["workers"] is not None:
        _state["workers"].close()
    if _state["file"] is not None:
        _state["file"].close()
    _state.update(dir=None, workers=None, file=None, store=None)
