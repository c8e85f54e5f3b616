"""kernels_cpu.kernel_thread: the kernels' parallel regions start on the main thread while it alone calls, else on one
kernel thread whichever thread calls, so the process keeps one OpenMP team (a second team makes libgomp throttle its
workers' waits: forwards 2-3x slower)."""
import os
import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import psutil
import pytest
from numba import njit, prange

from conftest import model_path
from kernels_cpu.kernel_thread import call_parallel, release_thread_team


def test_calls_run_on_one_thread_in_order_with_results_and_errors():
    seen = []

    def job(i):
        seen.append((i, threading.get_ident()))
        return i * i

    callers = [threading.Thread(target=lambda i=i: job_results.append(call_parallel(job, i))) for i in range(4)]
    job_results = []
    for t in callers:
        t.start()
        t.join()
    assert sorted(job_results) == [0, 1, 4, 9]
    assert call_parallel(job, 5) == 25
    assert len({ident for _, ident in seen}) == 1 and seen[0][1] != threading.get_ident()

    def nested():  # a kernel-thread call that asks again runs directly (no deadlock)
        return call_parallel(threading.get_ident), threading.get_ident()

    inner, outer = call_parallel(nested)
    assert inner == outer

    def fails():
        raise ValueError("bad shape")

    with pytest.raises(ValueError, match="bad shape"):
        call_parallel(fails)
    assert call_parallel(lambda a, b=0: a + b, 1, b=2) == 3  # still serving after an error


@njit(parallel=True)
def _parallel_sum(x):
    total = 0.0
    for i in prange(x.shape[0]):
        total += x[i]
    return total


def test_forwards_from_several_threads_share_one_team():
    """The model is loaded here (the main thread) and run from three threads that stay alive: the process's thread
    count is what one team needs, not one team per calling thread."""
    import edgeinfer

    release_thread_team()
    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=64, n_threads=2) as model:
        model.engine.prefill([1, 2, 3])
        process = psutil.Process()
        before = process.num_threads()
        go_on, counted = threading.Event(), []

        def decode(token):
            model.logits([1, 2, token])
            counted.append(process.num_threads())
            go_on.wait(60)

        callers = [threading.Thread(target=decode, args=(t,)) for t in (5, 6, 7)]
        for t in callers:
            t.start()
        while len(counted) < 3:
            go_on.wait(0.01)
        during = process.num_threads()
        go_on.set()
        for t in callers:
            t.join()
    assert during == before + 3, (before, during)  # the three callers themselves, no workers of their own


def test_release_thread_team_gives_back_this_threads_workers():
    numba.set_num_threads(2)
    process = psutil.Process()
    release_thread_team()
    before = process.num_threads()
    _parallel_sum(np.ones(1000))  # a parallel region started here: this thread's own team
    with_team = process.num_threads()
    release_thread_team()
    after = process.num_threads()
    if numba.threading_layer() == "omp" and with_team > before:  # libgomp: its worker exits
        assert after == before, (before, with_team, after)
    else:  # other layers keep one pool for the process: nothing to give back, and nothing breaks
        assert after <= with_team
    assert _parallel_sum(np.ones(1000)) == 1000.0  # a new region after the release makes a new team
    release_thread_team()


# the start of the fresh-process scripts below: a parallel region, and where (on which thread) a call ran it
_WHERE = textwrap.dedent("""
    import threading
    import numpy as np
    from numba import njit, prange
    from kernels_cpu import kernel_thread

    @njit(parallel=True)
    def total(x):
        s = 0.0
        for i in prange(x.shape[0]):
            s += x[i]
        return s

    def where(x):
        return total(x), threading.current_thread().name
""")


def test_the_main_thread_alone_runs_inline_until_another_thread_calls():
    """In a fresh process (the module's state is per process): the main thread's calls run on it, no kernel thread;
    after a worker's call, the main thread's calls go to the kernel thread too."""
    script = _WHERE + textwrap.dedent("""
        x = np.ones(100)
        assert kernel_thread.call_parallel(where, x) == (100.0, "MainThread")
        assert kernel_thread._thread is None
        worker = []
        t = threading.Thread(target=lambda: worker.append(kernel_thread.call_parallel(where, x)), name="worker")
        t.start()
        t.join()
        assert worker == [(100.0, "edgeinfer-kernels")], worker
        assert kernel_thread.call_parallel(where, x) == (100.0, "edgeinfer-kernels")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_api_calls_on_the_main_thread_leave_no_team_behind():
    """An app that warms the model up on its main thread and then generates from a thread pool: each public call on
    the main thread gives the main thread's team back when it ends (CPURunner.idle), so the pool's calls find one
    team in the process, the kernel thread's (a team left on the main thread made them 2-3x slower). In a fresh
    process, where the main thread runs inline."""
    script = textwrap.dedent(f"""
        import threading
        import time
        import numba
        import psutil
        import edgeinfer
        from kernels_cpu import kernel_thread

        process = psutil.Process()

        def threads(expected):  # (a released worker leaves the thread list a moment after the release returns)
            for _ in range(200):
                if process.num_threads() == expected:
                    break
                time.sleep(0.005)
            return process.num_threads()

        model = edgeinfer.load({str(model_path("smollm2-135m-instruct"))!r}, n_ctx=64, n_threads=2)
        before = process.num_threads()
        model.logits([1, 2, 3])
        assert kernel_thread._thread is None  # ran inline on the main thread
        assert threads(before) == before, ("logits", before, process.num_threads())
        pieces = model.stream([1, 2, 3], max_tokens=4, temperature=0, speculative="off")
        next(pieces)
        team = process.num_threads() - before  # the main thread's workers, while its stream runs
        if numba.threading_layer() == "omp":
            assert team == numba.get_num_threads() - 1, (before, team)
        pieces.close()  # a stream abandoned early
        assert threads(before) == before, ("closed stream", before, process.num_threads())
        "".join(model.stream([1, 2, 3], max_tokens=4, temperature=0, speculative="off"))
        assert threads(before) == before, ("stream", before, process.num_threads())
        model.generate_batch([[1, 2, 3], [4, 5]], max_tokens=2, temperature=0)
        assert threads(before) == before, ("generate_batch", before, process.num_threads())
        model.create_completion([1, 2, 3], max_tokens=2, temperature=0)
        assert threads(before) == before, ("create_completion", before, process.num_threads())
        model.session().warm_up()
        assert threads(before) == before, ("session warm-up", before, process.num_threads())
        worker = threading.Thread(target=model.logits, args=([1, 2, 3],))
        worker.start()
        worker.join()
        # now: the kernel thread and its team only
        assert threads(before + 1 + team) == before + 1 + team, ("pool", before, team, process.num_threads())
        print("ok")
    """)
    # the thread count must show OpenMP's workers only: BLAS libraries start pools of their own on first use (numpy's
    # and scipy's OpenBLAS, where numba has imported scipy), and so may a tokenizer
    quiet = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
             "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=quiet)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_a_server_whose_threads_take_every_cpu_cuts_libgomps_spin_before_its_first_region():
    """spin_briefly_if_cpus_are_shared sets GOMP_SPINCOUNT where the kernel threads take every CPU, so a finished
    region's worker sleeps instead of holding a CPU the event loop needs (serve calls it before loading); never
    with fewer threads than CPUs, over the user's own setting, or once libgomp has loaded (it reads it once)."""
    script = textwrap.dedent("""
        import os, sys
        import numpy as np
        from numba import njit, prange
        from kernels_cpu.kernel_thread import SHARED_CPUS_SPIN_COUNT, spin_briefly_if_cpus_are_shared as spin
        cpus = len(os.sched_getaffinity(0))
        user = os.environ.get("GOMP_SPINCOUNT")
        assert not spin(cpus - 1) or cpus == 1
        if user is not None:
            assert not spin(cpus) and os.environ["GOMP_SPINCOUNT"] == user
            sys.exit(0)
        assert spin(cpus) and os.environ["GOMP_SPINCOUNT"] == str(SHARED_CPUS_SPIN_COUNT)
        del os.environ["GOMP_SPINCOUNT"]

        @njit(parallel=True)
        def region(a):
            for i in prange(a.shape[0]):
                a[i] += 1.0
        region(np.zeros(8))
        assert not spin(cpus) and "GOMP_SPINCOUNT" not in os.environ  # too late: libgomp has read its settings
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    for extra in ({}, {"GOMP_SPINCOUNT": "1234"}):
        done = subprocess.run([sys.executable, "-c", script], env={**env, **extra}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (extra, done.stderr[-2000:])


def test_a_hosting_thread_runs_its_calls_itself_and_others_still_get_theirs():
    """kernel_thread.hosting (a server's scheduler): the host's calls run on it, the kernel thread's team is given
    back meanwhile, so the process keeps one; a guest's call runs on the guest with a team given back after it; a
    second host is refused quietly; once hosting ends, calls go to the kernel thread again. In a fresh process."""
    script = _WHERE + textwrap.dedent("""
        import time
        import numba
        import psutil

        def on_thread(name, fn):
            box = []
            t = threading.Thread(target=lambda: box.append(fn()), name=name)
            t.start()
            t.join()
            return box[0]

        process = psutil.Process()
        def settled():  # (a released worker leaves the thread list a moment after the release returns)
            for _ in range(100):
                n = process.num_threads()
                time.sleep(0.01)
                if process.num_threads() == n:
                    return n
            return process.num_threads()

        x = np.ones(100)
        numba.set_num_threads(2)
        assert on_thread("worker", lambda: kernel_thread.call_parallel(where, x)) == (100.0, "edgeinfer-kernels")
        one_team = settled()  # main, the kernel thread and its team's worker
        in_host, seen = threading.Event(), []

        def host():
            with kernel_thread.hosting() as hosts:
                seen.append(hosts)
                seen.append(kernel_thread.call_parallel(where, x))
                seen.append(settled())
                in_host.set()
                go_on.wait(60)
                seen.append(kernel_thread.call_parallel(where, x))

        go_on = threading.Event()
        h = threading.Thread(target=host, name="host")
        h.start()
        in_host.wait(60)
        assert seen[:2] == [True, (100.0, "host")], seen
        omp = numba.threading_layer() == "omp"  # (other layers keep one pool for the process)
        assert seen[2] == one_team + 1 or not omp, (one_team, seen)  # + the host; the kernel thread's worker is gone
        assert on_thread("guest", lambda: kernel_thread.call_parallel(where, x)) == (100.0, "guest")
        assert settled() == one_team + 1 or not omp  # the guest's team went with the call
        assert on_thread("second", lambda: kernel_thread.hosting().__enter__()) is False
        go_on.set()
        h.join()
        assert seen[3] == (100.0, "host") and kernel_thread._host is None
        assert on_thread("worker", lambda: kernel_thread.call_parallel(where, x)) == (100.0, "edgeinfer-kernels")
        print("ok")
    """)
    quiet = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=quiet)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
