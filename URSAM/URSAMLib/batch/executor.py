"""Tasks on Dask distributed: a ``LocalCluster`` of worker processes, or an existing cluster by address.

``ursam batch`` runs one task per scan and ``ursam evaluate --workers`` one
per case on an :class:`Executor`. On a worker, :func:`run_task`

- sizes the process's thread pools to its share of the cores (torch, and
  ONNX Runtime's encoder through torch's count; ITK; the supports registered
  at once), so that N workers on a machine do not oversubscribe it;
- runs one of these tasks at a time, even on a worker with several Dask
  threads (the SAM model and its caches are not shared between scans at once);
- and :func:`worker_backend` loads a SAM model once per set of
  :class:`URSAMLib.sam.BackendOptions` and keeps it for every later task
  of that worker process.

Everything a task needs travels with it (paths, options); workers need URSAM
installed and the same file system as the client (the scans, the template
library and the output folder at the same paths).
"""
from __future__ import annotations

import logging
import threading
import warnings

import SimpleITK as sitk

from ..errors import URSAMError
from ..registration.affine import cores, limit_cores

#: SAM models of this process by (BackendOptions, percentile normalization)
_BACKENDS = {}
_BACKENDS_LOCK = threading.Lock()
#: one task of ours at a time in this process
_TASK_LOCK = threading.Lock()
_THREADS = [None]

#: how long the client waits for an existing scheduler to answer
CONNECT_TIMEOUT_S = 30


def configure_threads(threads):
    """This process's thread pools at ``threads``: torch (the ONNX Runtime encoder takes torch's count when
    the model is loaded), ITK's default, and the number of supports registered at once."""
    if _THREADS[0] == threads:
        return

    # The model packages' deprecation notices, once per worker process, would bury the progress bar.
    warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

    try:
        import torch  # noqa: PLC0415 (optional package)
    except ImportError:  # a worker that only registers (the atlas baseline) needs no torch
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    limit_cores(threads)
    _THREADS[0] = threads


def worker_backend(options, percentile=False):
    """The SAM model of ``options`` in this process, loaded on first use and kept."""
    key = (options, bool(percentile))
    with _BACKENDS_LOCK:
        if key not in _BACKENDS:
            _BACKENDS[key] = options.make(percentile)
        return _BACKENDS[key]


def _worker_threads():
    """The worker's own thread count (what a cluster manager gave its process), else every core."""
    try:
        from distributed import get_worker  # noqa: PLC0415 (optional package)

        n = getattr(get_worker(), "nthreads", None)
    except (ImportError, ValueError):
        n = None
    if n:
        return int(n)

    return cores()


def run_task(fn, threads, *args):
    """On a worker: ``fn(*args)`` with ``threads`` threads (None: the worker's own count), one at a time."""
    with _TASK_LOCK:
        configure_threads(threads or _worker_threads())
        return fn(*args)


def one_line(err):
    """An exception as one line of text, for a failure record."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    name = type(err).__name__
    return f"{name}: {first}" if first else name


class Executor:
    """Dask distributed for URSAM's tasks: ``LocalCluster`` of ``workers`` processes (default 1), or the
    cluster whose scheduler is at ``scheduler`` (``tcp://host:8786``). Use it as a context manager."""

    def __init__(self, workers=None, scheduler=None):
        if workers is not None and scheduler:
            raise URSAMError("give --workers (a cluster on this machine) or --scheduler (an existing cluster), "
                             "not both")
        if workers is not None and workers < 1:
            raise URSAMError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        self.scheduler = scheduler
        self.threads = None
        self.cluster = None
        self.client = None

    def __enter__(self):
        try:
            import distributed  # noqa: F401, PLC0415 (Dask: only where a cluster runs)
        except ImportError:
            raise URSAMError("running on Dask needs the package distributed (pip install 'dask[distributed]')") \
                from None
        from distributed import Client  # noqa: PLC0415 (Dask loads only where a cluster runs)

        if self.scheduler:
            try:
                self.client = Client(self.scheduler, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as err:
                raise URSAMError(f"cannot reach the Dask scheduler ({one_line(err)})", self.scheduler) from None
        else:
            self._start_local()
        return self

    def _start_local(self):
        from distributed import Client, LocalCluster  # noqa: PLC0415 (Dask loads only where a cluster runs)

        n = self.workers or 1
        self.threads = max(1, cores() // n)
        # BLAS and OpenMP read their thread counts when a process starts; Dask would set them to 1.
        env = {k: str(self.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        # No memory limit: a worker keeps the memory of its largest scan (URSAMLib.sam.backends.tune_malloc),
        # so Dask's memory manager would pause it for good or restart it; the operating system decides.
        self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, memory_limit=0, env=env,
                                    silence_logs=logging.ERROR, dashboard_address=":8787")
        self.client = Client(self.cluster)

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    @property
    def n_workers(self):
        return len(self.client.scheduler_info().get("workers", {})) if self.client else 0

    def describe(self):
        """One line: where the tasks run and the dashboard's address."""
        if self.cluster is not None:
            where = f"{self.workers or 1} local worker process(es), {self.threads} thread(s) each"
        else:
            where = f"the Dask cluster at {self.scheduler} ({self.n_workers} worker(s) now)"
        link = self.dashboard_link
        if link is None:
            link = "not served on this machine (it needs bokeh: pip install 'ursam[dashboard]')"
        return f"{where}; Dask dashboard: {link}"

    @property
    def dashboard_link(self):
        """The dashboard's address (None where a local cluster cannot serve it: no bokeh)."""
        if self.cluster is not None:
            try:
                import bokeh  # noqa: F401, PLC0415 (optional: the Dask dashboard)
            except ImportError:
                return None
        return getattr(self.client, "dashboard_link", None)

    def submit(self, fn, *args, key=None):
        """A future of ``fn(*args)`` on a worker (through :func:`run_task`)."""
        return self.client.submit(run_task, fn, self.threads, *args, key=key, pure=False)

    def completed(self, futures):
        """``(future, result, error)`` as each future finishes: ``error`` a one-line message where the task
        raised or its worker died."""
        from distributed import as_completed  # noqa: PLC0415 (Dask loads only where a cluster runs)

        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as err:  # a task that raised, or KilledWorker: recorded, the others go on
                yield future, None, _failure_text(err)
            else:
                yield future, result, None


def _failure_text(err):
    if type(err).__name__ == "KilledWorker":
        return "the worker process died while running it (out of memory, or a crash in a library)"
    return one_line(err)
