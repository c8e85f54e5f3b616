"""Where the compiled kernels' parallel regions start: the main thread, or one kernel thread for every other thread.

Numba's OpenMP threading layer (libgomp) gives every thread that starts a parallel region a team of worker threads of
its own, kept for that thread's life. Once two threads hold teams, the process manages more threads than it has
CPUs, and libgomp then cuts its workers' spin at the end of a region to a few hundred iterations (its "throttled"
spin count, which no environment variable lifts): a worker sleeps between regions, and each region pays a futex
wake. Measured on 2 cores when each op of a forward pass was a region of its own, ~150 of them (the pass is one
region now, kernels_cpu.forward, but each call still starts one), SmolLM2, a model loaded on the main thread and run
from another: one decode row 3.4 -> 8-11 ms, eight rows 6.6 -> 18-25 ms. An app that loads a model at start-up and
generates from a worker thread (a GUI, a web framework's thread pool) paid that on every token.

So `call_parallel` runs a kernel call
- on the main thread itself while no other thread has asked for one (the command line's case: no hand-off);
- else on one long-lived kernel thread, whichever thread asks (the main thread too, once it has given its own team
  back), so however many threads call there is one team. A hand-off costs 70-80 us at 2 threads here (the caller
  wakes while the team's worker still spins), against a decode step's 3-8 ms.
Calls run one at a time, in the order they came (also what keeps two forward passes from running at once: they would
split the same cores, and Numba's workqueue layer aborts the process on concurrent regions). `release_main_team`
gives the main thread's team back: after a model has loaded (repacking starts regions), and at the end of each public
API call made on the main thread (edgeinfer.backends.cpu.CPURunner.idle: ~70 us, plus ~100 us for a new team at the
next call). So an app that loads the model, or warms it up, on its main thread and then generates from others holds
one team (measured: 64 tokens from a pool thread after a warm-up on the main thread, 543-650 -> 264-301 ms).

A thread that makes nearly every call for a long while (a server's scheduler) can host them instead (`hosting`):
its calls then run on it, with no hand-off; the kernel thread gives its team back meanwhile, so the process still
has one. Measured in `edgeinfer serve` on SmolLM2 (2 cores, where the event loop and the clients compete for the
CPUs and a woken kernel thread may wait for one), 6 rounds taking turns with the hand-off: one stream 333 -> 355
tokens/s (means), eight streams 1396 -> 1459. A call from another thread while a host is there runs on its own
thread with a team of its own, given back after the call: slower (a new team each time, and libgomp throttles both
teams' spin during it), never blocked.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numba

_lock = threading.RLock()  # one kernel call at a time in the process
_jobs: queue.SimpleQueue | None = None
_thread: threading.Thread | None = None
_start_lock = threading.Lock()
_host: threading.Thread | None = None  # the thread inside `hosting`, if one is


def call_parallel(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), a call that starts parallel regions, run where the process keeps its one team (see the
    module docstring); its result, or its exception raised here. From another thread than the main one, an
    interrupt that arrives while it runs is raised once it has finished, as after a call made on this thread."""
    caller = threading.current_thread()
    if caller is _thread:  # a kernel call inside one
        return fn(*args, **kwargs)
    if _host is not None:
        with _lock:
            if _host is caller:
                return fn(*args, **kwargs)
            if _host is not None:  # a guest of the host: its own team for this call only
                try:
                    return fn(*args, **kwargs)
                finally:
                    release_thread_team()
    if caller is threading.main_thread():
        with _lock:
            if _thread is None:  # the main thread alone so far: its own team, no hand-off
                return fn(*args, **kwargs)
            release_thread_team()  # other threads have called: from now on the kernel thread's team only
    jobs = _jobs if _jobs is not None else _start()
    done = threading.Lock()
    done.acquire()
    box: list = []
    jobs.put((fn, args, kwargs, box, done))
    try:
        done.acquire()
    except BaseException:
        done.acquire()  # the call is under way and writes into the caller's arrays: let it finish first
        raise
    result, error = box
    if error is not None:
        raise error
    return result


def call_with_threads(n_threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    """call_parallel(fn, *args) with its parallel regions on n_threads threads. Numba's thread count is a setting of
    each thread, so it is made on the thread that runs the call, not on the caller's."""
    return call_parallel(_with_threads, int(n_threads), fn, args)


def _with_threads(n_threads: int, fn: Callable[..., Any], args: tuple) -> Any:
    numba.set_num_threads(n_threads)
    return fn(*args)


@contextmanager
def hosting() -> Iterator[bool]:
    """Within it, the calling thread's kernel calls run on it (the module docstring says when that pays); the kernel
    thread's team is given back first, the host's own once it ends. One host at a time: where another thread hosts
    already, nothing changes (it yields False; True where this thread hosts)."""
    global _host
    caller = threading.current_thread()
    if _host is not None:
        yield False
        return
    if _thread is not None and caller is not _thread:
        call_parallel(release_thread_team)  # the kernel thread's team, on that thread
    with _lock:
        hosts = _host is None
        if hosts:
            _host = caller
    if not hosts:
        yield False
        return
    try:
        yield True
    finally:
        with _lock:
            _host = None
            release_thread_team()


def release_main_team() -> None:
    """On the main thread, give its team back (after a model has loaded: other threads may run it from now on, and
    the main thread's team, kept, would throttle the kernel thread's); the main thread's next kernel call makes a new
    one. Elsewhere nothing: other threads hold no team."""
    if threading.current_thread() is threading.main_thread():
        with _lock:
            release_thread_team()


def _start() -> queue.SimpleQueue:
    global _jobs, _thread
    with _start_lock:
        if _jobs is None:
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            _thread = threading.Thread(target=_serve, args=(jobs,), name="edgeinfer-kernels", daemon=True)
            _thread.start()
            _jobs = jobs
    return _jobs


def _serve(jobs: queue.SimpleQueue) -> None:
    while True:
        fn, args, kwargs, box, done = jobs.get()
        try:
            with _lock:
                box += [fn(*args, **kwargs), None]
                if _host is not None:  # (a call queued just before a host came): no second team beside the host's
                    release_thread_team()
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            box += [None, e]
        finally:
            del fn, args, kwargs  # the caller's arrays are not kept alive until the next call
            done.release()


def _forget_after_fork() -> None:
    """A forked child has no kernel thread (only the forking thread survives a fork): it starts its own."""
    global _jobs, _thread, _lock, _start_lock, _host
    _jobs, _thread, _lock, _start_lock, _host = None, None, threading.RLock(), threading.Lock(), None


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_forget_after_fork)


def release_thread_team() -> None:
    """Give back the calling thread's OpenMP team, if it has one (libgomp's omp_pause_resource_all: its workers
    exit); the next parallel region it starts makes a new one. A no-op where Numba's threads are not libgomp's."""
    libgomp = _libgomp()
    if libgomp is not None:
        libgomp.omp_pause_resource_all(1)  # omp_pause_soft


# Iterations an OpenMP worker spins at the end of a region before it sleeps, where the kernel threads take every CPU.
# libgomp's default (300,000) keeps a worker spinning ~4.4 ms after each region here (the CPU time it burns while the
# main thread sleeps), so between an agent's requests it held one of 2 vCPUs while the server's event loop and the
# client worked, and the next forward pass waited for it: SmolLM2's 1-token answers after a cached prefix, 3 x 100
# over HTTP, p99 17.6-32 ms against p50 10.7-15.5. At 30,000 (~0.8 ms) the worker sleeps through such a gap and
# wakes when the next pass starts: p99 13.0-15.1 ms, p50 11.2-11.4. At 10,000 decode steps of 8 streams paid a
# wake each (-10-15% tokens/s); at 30,000 -3% (4 interleaved pairs, within this VM's noise); at 100,000 the p99
# came back (21-25 ms).
SHARED_CPUS_SPIN_COUNT = 30000


def spin_briefly_if_cpus_are_shared(n_threads: int) -> bool:
    """Set libgomp's spin count (GOMP_SPINCOUNT) to SHARED_CPUS_SPIN_COUNT where n_threads kernel threads take every
    CPU this process may use, so that other threads (a server's event loop, its clients) get the CPU a finished
    region's worker would have spun on. libgomp reads it once, when it loads (at the process's first parallel region):
    later, and where the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY, nothing is changed. Returns whether it was set."""
    import numba.np.ufunc.parallel as numba_parallel

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # (not Linux)
        cpus = os.cpu_count() or 1
    if (n_threads < cpus or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ
            or getattr(numba_parallel, "_is_initialized", True)):
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SHARED_CPUS_SPIN_COUNT)
    return True


_LIBGOMP: list = []  # [the libgomp handle, or None where Numba's threads are not libgomp's], once known


def _libgomp():
    if _LIBGOMP:
        return _LIBGOMP[0]
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run in this process: there is no team to give back
        return None
    lib = None
    if layer == "omp":
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("gomp") or "libgomp.so.1")
            lib.omp_pause_resource_all.argtypes, lib.omp_pause_resource_all.restype = [ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):  # another OpenMP runtime, or a libgomp older than OpenMP 5.0
            lib = None
    _LIBGOMP.append(lib)
    return lib
