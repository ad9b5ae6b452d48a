"""The worker process (:mod:`URSAMMRML.worker`) seen from Slicer: start it, read its events, end it. No Qt.

Nothing here blocks the caller and no Python thread is used: Slicer's main
thread keeps the GIL while its event loop idles, so a reader thread would
starve and the worker would stall on a full pipe. The worker's stdout goes
to a file in the job folder instead, and :meth:`WorkerProcess.poll` (called
from the panel's timer) reads the lines added since the last call.

Cancel ends the worker and everything it started at once: the worker runs in
its own process group (POSIX) or process tree (Windows ``taskkill /T``),
because PythonSlicer is a launcher that starts the real Python as a child.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from URSAMLib.errors import URSAMError

from . import worker

#: the folder that holds URSAMLib and URSAMMRML (the scripted module's folder)
MODULE_DIR = str(Path(__file__).resolve().parents[1])
JOB_PREFIX = "URSAM-job-"


def newJobDir(tempRoot=None):
    """A new private job folder (``mkdtemp``: only this user can read the result it will hold)."""
    root = Path(tempRoot) if tempRoot else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=JOB_PREFIX, dir=str(root)))


def removeJobDir(jobDir):
    """Remove a job folder; retried briefly, as Windows keeps a killed process's files open a moment."""
    for attempt in range(20):
        try:
            shutil.rmtree(jobDir)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.05)
    shutil.rmtree(jobDir, ignore_errors=True)
    return not Path(jobDir).exists()


def workerEnvironment(env=None):
    """The environment of a worker: the caller's, with the module's folder first on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([MODULE_DIR] + [p for p in paths if p != MODULE_DIR])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class WorkerProcess:
    """One worker process on one job folder.

    ``python``: the interpreter (in Slicer: PythonSlicer); ``env``: its
    environment (default: this process's). The job folder must hold a job
    (:func:`URSAMMRML.worker.write_job`); the worker writes its events and
    log beside it.
    """

    def __init__(self, jobDir, python=None, env=None, parentPid=None, serve=False):
        self.jobDir = Path(jobDir)
        #: a persistent worker (``--serve``), which reads its requests on stdin (:meth:`send`)
        self.serve = serve
        self.python = python or sys.executable
        self.env = env
        self.parentPid = os.getpid() if parentPid is None else parentPid
        self.proc = None
        self.returncode = None
        self.events = []
        self.startedAt = None
        self.endedAt = None
        self.killed = False
        self._events = None
        self._log = None
        self._pending = b""

    def command(self):
        cmd = [self.python, "-m", "URSAMMRML.worker", str(self.jobDir)]
        if self.parentPid:
            cmd += ["--parent-pid", str(self.parentPid)]
        if self.serve:
            cmd.append("--serve")
        return cmd

    def start(self):
        out = open(self.jobDir / worker.EVENTS_FILE, "wb")
        self._log = open(self.jobDir / worker.LOG_FILE, "wb")
        kwargs = {"stdin": subprocess.PIPE if self.serve else subprocess.DEVNULL, "stdout": out, "stderr": self._log, "cwd": MODULE_DIR,
                  "env": workerEnvironment(self.env)}
        if os.name == "nt":
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = 0  # no console window (as slicer.util.launchConsoleProcess)
            kwargs["startupinfo"] = info
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # its own process group, which Cancel kills whole
        try:
            self.proc = subprocess.Popen(self.command(), **kwargs)
        except OSError as err:
            out.close()
            self._closeFiles()
            raise URSAMError(f"cannot start the URSAM worker with {self.python} ({err.strerror or err})") from None
        finally:
            out.close()  # the worker has its own handle now
        self.startedAt = time.perf_counter()
        self._events = open(self.jobDir / worker.EVENTS_FILE, "rb")
        return self

    @property
    def running(self):
        return self.proc is not None and self.returncode is None

    def send(self, request):
        """Send one request (a dict, as one JSON line) to a persistent worker; False where it has ended.

        A request is a line of a few hundred bytes, far below the pipe's buffer, so the write does not block.
        """
        if not self.serve or not self.running or self.proc.stdin is None:
            return False
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def poll(self):
        """The events the worker printed since the last call (dicts); sets :attr:`returncode` once it ended.

        The exit status is taken before the last read, so that every event the
        worker wrote before it ended is returned before the run counts as ended.
        """
        if self.proc is None or self._events is None:
            return []
        code = self.proc.poll()
        data = self._pending + self._events.read()
        lines = data.split(b"\n")
        self._pending = lines.pop()
        if code is not None:
            if self._pending.strip():
                lines.append(self._pending)
            self._pending = b""
        new = [_parseEvent(line) for line in lines if line.strip()]
        self.events += new
        if code is not None:
            self.returncode = code
            self.endedAt = time.perf_counter()
            self._closeFiles()
        return new

    def wait(self, timeout=None, interval=0.05):
        """Poll until the worker ends (or ``timeout`` seconds pass); returns the events read meanwhile."""
        t0 = time.perf_counter()
        got = []
        while self.running:
            got += self.poll()
            if not self.running or (timeout is not None and time.perf_counter() - t0 > timeout):
                break
            time.sleep(interval)
        return got

    def kill(self):
        """End the worker and its children now (no grace period: nothing it holds needs saving)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.killed = True
            killTree(self.proc)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.returncode = self.proc.returncode
        self.endedAt = time.perf_counter()
        self._closeFiles()

    def error(self):
        """The worker's one-line failure message (None if it ended well)."""
        if self.returncode in (None, worker.EXIT_DONE) and not self.killed:
            return None
        for event in reversed(self.events):
            if event.get("event") == "error":
                return event.get("message") or "the URSAM worker failed"
        if self.killed:
            return "the URSAM worker was stopped"
        return f"the URSAM worker ended with exit code {self.returncode}: {self.lastLogLine() or 'no message'}"

    def lastLogLine(self):
        try:
            text = (self.jobDir / worker.LOG_FILE).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def _closeFiles(self):
        for name in ("_events", "_log"):
            handle = getattr(self, name)
            if handle is not None:
                handle.close()
                setattr(self, name, None)
        if self.proc is not None and self.proc.stdin is not None and self.proc.poll() is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass


def _parseEvent(raw):
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        event = json.loads(text)
    except ValueError:
        event = None
    if not isinstance(event, dict) or "event" not in event:
        return {"event": "output", "message": text}
    return event


def processGroupAlive(pid):
    """Whether any process of the group led by ``pid`` (a worker: :func:`killTree`) still runs (POSIX)."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def killTree(proc):
    """Kill a process started by :class:`WorkerProcess` and every process it started."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session made the worker its group's leader
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.kill()
    except OSError:
        pass
