"""Reliability: signal storms, a full disk for the log, resource leaks."""
import os
import random
import signal
import time

import pytest

from test_processhandler import (DEADLINE, alive, descendants, proc_state,
                                 proj, wait_for)  # noqa: F401 (fixture)


QUIET_WORKER = '''
    import time, processhandler
    class Quiet(processhandler.Worker):
        def run(self):
            time.sleep(float(self.cfg.get('run_time', '0.02')))
            return True
'''


def live_workers(master):
    return [p for p in descendants(master) if proc_state(p) not in (None, 'Z')]


def test_signal_storm_master_survives_and_converges(proj):
    """Hundreds of mixed signals per second for a few seconds: the master
    stays alive, live workers never exceed the target plus one reload's
    surplus, and afterwards the count converges to what status reports."""
    proj.write_module('quiet', QUIET_WORKER)
    proj.write_config(worker_class='quiet:Quiet', number_workers=3,
                      graceful_timeout=2)
    master = proj.start_daemon()
    proj.wait_running(3)
    mix = [signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU,
           signal.SIGCHLD]
    rng = random.Random(7)
    sent, peak, target_max = 0, 0, 3
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        sig = rng.choice(mix)
        if sig == signal.SIGTTIN:
            target_max += 1
        os.kill(master, sig)
        sent += 1
        if sent % 20 == 0:
            peak = max(peak, len(live_workers(master)))
        time.sleep(0.002)
    assert alive(master)
    print('storm: %d signals in 3 s, peak %d live workers' % (sent, peak))
    assert sent >= 600
    # Running + booting + the stopping ones of the previous generation:
    # at most twice the largest target the TTINs could have made, plus
    # the ones still on their way out.
    assert peak <= 2 * target_max + 3

    def converged():
        doc = proj.status()
        if doc is None:
            return None
        n = doc['master']['number_workers']
        rows = doc['workers']
        ok = (len(rows) == n and all(w['state'] == 'running' for w in rows)
              and len(live_workers(master)) == n)
        return n if ok else None
    n = wait_for(converged, what='worker count to converge')
    assert n >= 1
    assert proj.ph('stop').returncode == 0
    assert not alive(master)


def test_full_disk_log_fails_loudly_once_and_nothing_crashes(proj):
    """log_file = /dev/full: every write fails (ENOSPC).  Each process says
    so once on stderr; master and workers keep running; stop works."""
    proj.write_config(log_file='/dev/full', number_workers=2, run_time=0.01)
    p = proj.start_foreground()
    workers = proj.wait_running(2)
    wait_for(lambda: len(proj.events('run_end')) > 40)
    assert alive(p.pid) and all(alive(w) for w in workers.values())
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(DEADLINE) == 0
    out = proj.fg_output()
    complaints = [l for l in out.splitlines() if 'cannot write to log' in l]
    # once per process (a reopen, USR1, would re-arm the warning)
    pids = [l.split('[')[1].split(']')[0] for l in complaints]
    assert complaints, out
    assert len(pids) == len(set(pids)), complaints
    assert 'No space left on device' in complaints[0]
    assert 'Traceback' not in out


def fd_count(pid):
    return len(os.listdir('/proc/%d/fd' % pid))


def rss_kb(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])


@pytest.mark.slow
def test_no_fd_or_memory_leak_over_many_recycles(proj):
    """max_requests = 1: thousands of worker recycles (10,000, or as many as
    fit in the time bound); the master's fd count is unchanged and its RSS
    grows by less than 4 MB after warm-up."""
    proj.write_module('quiet', QUIET_WORKER)
    proj.write_config(worker_class='quiet:Quiet', number_workers=2,
                      max_requests=1, run_time=0, log_level='warning')
    master = proj.start_daemon()
    proj.wait_running(2)

    def spawns():
        doc = proj.status()
        return doc['master']['spawns'] if doc else 0
    wait_for(lambda: spawns() >= 500, 120, '500 recycles (warm-up)')
    fds0, rss0 = fd_count(master), rss_kb(master)
    limit = time.monotonic() + float(os.environ.get('PH_SOAK_SECONDS', '150'))
    target = 10000
    n = spawns()
    while n < target and time.monotonic() < limit:
        time.sleep(1.0)
        n = spawns()
    fds1, rss1 = fd_count(master), rss_kb(master)
    print('recycles: %d; master fds %d -> %d; RSS %d -> %d kB'
          % (n, fds0, fds1, rss0, rss1))
    assert n >= 2000, 'too few recycles to judge: %d' % n
    assert fds1 == fds0
    assert rss1 - rss0 < 4096
    assert proj.ph('stop').returncode == 0
