"""Arbiter and worker behaviour seen from outside: signals (TTIN/TTOU, INT,
QUIT, TERM, WINCH, HUP, USR1), rolling reload, recycling, backoff, process
titles, the child subreaper, and the log format.

Real processes and real signals; observed through ``status --json``, /proc,
events.log (written by TEST_WORKER) and the log file.  Every wait is
``wait_for``.  Signals are sent one at a time and their effect awaited before
the next: two identical standard signals pending at once merge into one.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from test_processhandler import (
    DEADLINE, PY, TEST_WORKER, alive, cmdline, comm,
    descendants, ppid_of, proc_state, proj, wait_for)

HERE = os.path.dirname(os.path.abspath(__file__))

# One log record: "2026-01-02 03:04:05.678 [pid] [LEVEL] name master: msg"
# or "... name worker 3: msg".  Continuation lines start with '  | '.
RECORD = re.compile(
    r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[(\d+)\] '
    r'\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] (\S+) '
    r'(master|worker (\d+)): (.*)$')
CONTINUATION = re.compile(r'^  \| ')

assert proj  # the fixture: imported by name so pytest finds it here


# -- helpers -------------------------------------------------------------------

def master_doc(p):
    doc = p.status()
    return doc['master'] if doc else None


def rows(p, state=None):
    doc = p.status()
    if doc is None:
        return None
    return [w for w in doc['workers'] if state is None or w['state'] == state]


def wait_workers_number(p, n):
    """Until the master wants ``n`` workers and exactly ``n`` run."""
    def check():
        doc = p.status()
        if doc is None or doc['master']['number_workers'] != n:
            return None
        live = [w for w in doc['workers'] if w['pid']]
        if len(live) != n or any(w['state'] != 'running' for w in live):
            return None
        return dict((w['slot'], w['pid']) for w in live)
    return wait_for(check, what='%d workers wanted and running' % n)


def parse_log(path):
    """[(pid, level, name, tag, slot or None, message)]; fails on any line
    that is neither a record nor a continuation of one."""
    out = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for i, line in enumerate(f.read().split('\n')[:-1]):
            m = RECORD.match(line)
            if m:
                out.append((int(m.group(1)), m.group(2), m.group(3),
                            m.group(4), int(m.group(5)) if m.group(5)
                            else None, m.group(6)))
                continue
            assert CONTINUATION.match(line) and out, (
                'line %d of %s is neither a record nor a continuation: %r'
                % (i + 1, path, line[:300]))
    return out


def by_pid(events):
    out = {}
    for ev in events:
        out.setdefault(ev[2], []).append(ev)
    return out


def send(pid, sig):
    os.kill(pid, sig)


# -- 1. TTIN / TTOU --------------------------------------------------------------

def test_ttin_ttou_follow_worker_count_never_below_one(proj):
    """TTIN adds a worker per signal, TTOU removes one (the highest slot),
    and TTOU at one worker leaves that worker alone."""
    proj.write_config(number_workers=2)
    master = proj.start_daemon()
    first = proj.wait_running(2)
    for n in (3, 4, 5):
        send(master, signal.SIGTTIN)
        now = wait_workers_number(proj, n)
        assert set(now) == set(range(1, n + 1))
    assert now[1] == first[1] and now[2] == first[2]   # untouched
    for n in (4, 3, 2, 1):
        send(master, signal.SIGTTOU)
        now = wait_workers_number(proj, n)
        assert set(now) == set(range(1, n + 1))
    removed = [proj.workers - {now[1]}]
    wait_for(lambda: not any(alive(p) for p in removed[0]),
             what='removed workers to exit')
    last = now[1]
    assert last == first[1]
    # TTOU at one worker: nothing changes.  A status answer comes after
    # the signal was dispatched (accept and read take two loop turns).
    send(master, signal.SIGTTOU)
    doc = proj.status()
    assert doc['master']['number_workers'] == 1
    send(master, signal.SIGTTOU)
    assert master_doc(proj)['number_workers'] == 1
    assert proj.running_workers(1) == {1: last}
    assert alive(last)
    assert '-> 0 worker' not in proj.log_text()
    # and the count still goes up from 1, not from 0 or below
    send(master, signal.SIGTTIN)
    assert set(wait_workers_number(proj, 2)) == {1, 2}


# -- 2. INT, QUIT, TERM ------------------------------------------------------------

@pytest.mark.parametrize('signame', ['SIGINT', 'SIGQUIT'])
def test_int_quit_quick_stop_foreground_exits_0(proj, signame):
    """INT and QUIT stop at once: workers in the middle of a 60 s run do not
    finish it, nothing waits for graceful_timeout (30 s), the foreground
    master exits 0 and no worker is left."""
    proj.write_config(number_workers=2, run_time=60, graceful_timeout=30)
    p = proj.start_foreground()
    wait_for(lambda: len(proj.events('run_start')) >= 2,
             what='both workers inside run()')
    workers = set(ev[2] for ev in proj.events('init'))
    assert len(workers) == 2
    proj.workers |= workers
    t0 = time.monotonic()
    send(p.pid, getattr(signal, signame))
    assert p.wait(60) == 0, proj.fg_output()
    took = time.monotonic() - t0
    assert took < 10, 'quick stop took %.1fs' % took
    assert not any(alive(w) for w in workers)
    assert proj.events('run_end') == []        # runs were cut short
    assert 'Traceback' not in proj.fg_output()


def test_term_foreground_exits_0_after_run_called(proj):
    """TERM on a foreground master: exit 0, each worker's after_run ran,
    no worker left."""
    proj.write_config(number_workers=2, run_time=0.3)
    p = proj.start_foreground()
    wait_for(lambda: len(set(ev[2] for ev in proj.events('run_end'))) >= 2,
             what='both workers running jobs')
    workers = set(ev[2] for ev in proj.events('init'))
    proj.workers |= workers
    send(p.pid, signal.SIGTERM)
    assert p.wait(DEADLINE) == 0, proj.fg_output()
    assert not any(alive(w) for w in workers)
    assert set(ev[2] for ev in proj.events('after_run')) == workers


# -- 3. WINCH ------------------------------------------------------------------------

def test_winch_daemon_stops_workers_master_stays(proj):
    """WINCH on a daemon: every worker stops, the master stays and answers;
    TTIN then brings one worker back."""
    proj.write_config(number_workers=2)
    master = proj.start_daemon()
    first = proj.wait_running(2)
    send(master, signal.SIGWINCH)

    def all_stopped():
        doc = proj.status()
        return doc is not None and doc['master']['number_workers'] == 0 \
            and not [w for w in doc['workers'] if w['pid']]
    wait_for(all_stopped, what='no worker after WINCH')
    wait_for(lambda: not any(alive(p) for p in first.values()))
    assert alive(master)
    assert set(ev[2] for ev in proj.events('after_run')) == \
        set(first.values())                       # graceful
    send(master, signal.SIGTTIN)
    back = wait_workers_number(proj, 1)
    assert back[1] not in first.values()
    assert alive(master)


def test_winch_ignored_in_foreground(proj):
    """WINCH on a foreground master (a terminal resize) is ignored: the
    workers keep running; a TTIN sent after it adds to the same two."""
    proj.write_config(number_workers=2)
    p = proj.start_foreground()
    first = proj.wait_running(2)
    send(p.pid, signal.SIGWINCH)
    send(p.pid, signal.SIGTTIN)
    now = wait_workers_number(proj, 3)
    assert now[1] == first[1] and now[2] == first[2]
    assert all(alive(w) for w in first.values())
    assert proj.events('after_run') == []
    assert p.poll() is None


# -- 4. HUP ----------------------------------------------------------------------------

NEW_CODE_MARK = "# new code\nCODE = 'code2'\n"


def test_hup_rolling_reload_new_booted_before_old_stop(proj):
    """HUP: new workers (new code, new config) have returned from init()
    before the old worker of their slot is asked to stop; at every sample
    during the reload at least N workers are running; new workers run the
    re-imported module."""
    n = 2
    proj.write_config(number_workers=n, run_time=0.05, version='v1')
    master = proj.start_daemon()
    old = proj.wait_running(n)
    # New code (different size, so no stale .pyc) and a slow new init().
    proj.write_module('testworker', TEST_WORKER.replace(
        "self.cfg.get('version', 'v1'))",
        "CODE + ':' + self.cfg.get('version', 'v1'))") + NEW_CODE_MARK)
    proj.write_config(number_workers=n, run_time=0.05, version='v2',
                      init_mode='slow', init_time=3)
    t_hup = time.monotonic()
    send(master, signal.SIGHUP)
    samples = []

    def replaced():
        doc = proj.status()
        if doc is None:
            return None
        running = [w for w in doc['workers'] if w['state'] == 'running']
        samples.append((len(running), sorted(w['state'] for w in
                                             doc['workers'])))
        pids = set(w['pid'] for w in running)
        if len(running) == n and not pids & set(old.values()) and \
                not any(alive(p) for p in old.values()):
            return dict((w['slot'], w['pid']) for w in running)
        return None
    new = wait_for(replaced, what='old workers replaced')
    assert min(s[0] for s in samples) >= n, samples
    # the window was really sampled: new ones booting, old ones running
    assert any('booting' in s[1] for s in samples), samples
    assert set(new) == set(old)
    inits = dict((ev[2], ev) for ev in proj.events('init'))
    for slot, pid in new.items():
        assert inits[pid][4] == 'code2:v2', inits[pid]
        assert inits[pid][1] == slot
        assert inits[pid][3] > t_hup + 2.9       # the slow init ran
    afters = dict((ev[2], ev) for ev in proj.events('after_run'))
    for slot, pid in old.items():
        assert pid in afters, 'old worker %d did not stop gracefully' % pid
        # the old worker of this slot left after the new one booted
        assert afters[pid][3] > inits[new[slot]][3], (afters[pid],
                                                      inits[new[slot]])
    assert master_doc(proj)['generation'] == 2


def test_hup_resets_worker_count_to_config(proj):
    """TTIN changes last until HUP: the config's number_workers is applied
    again; a changed number_workers in the config is applied by HUP."""
    proj.write_config(number_workers=2)
    master = proj.start_daemon()
    proj.wait_running(2)
    send(master, signal.SIGTTIN)
    wait_workers_number(proj, 3)
    send(master, signal.SIGHUP)

    def two_new():
        doc = proj.status()
        if doc is None or doc['master']['generation'] != 2:
            return None
        live = [w for w in doc['workers'] if w['pid']]
        return doc['master']['number_workers'] == 2 and len(live) == 2 and \
            all(w['generation'] == 2 and w['state'] == 'running'
                for w in live)
    wait_for(two_new, what='2 workers of generation 2')
    proj.write_config(number_workers=3)
    send(master, signal.SIGHUP)

    def three_new():
        doc = proj.status()
        if doc is None or doc['master']['generation'] != 3:
            return None
        live = [w for w in doc['workers'] if w['pid']]
        return len(live) == 3 and all(
            w['generation'] == 3 and w['state'] == 'running' for w in live)
    wait_for(three_new, what='3 workers of generation 3')


def test_hup_with_broken_worker_code_keeps_old_workers(proj):
    """HUP while the worker module has a syntax error: the master logs the
    failed reload, keeps the same worker pids, status still answers, and a
    later HUP with fixed code works."""
    proj.write_config(number_workers=2)
    master = proj.start_daemon()
    old = proj.wait_running(2)
    proj.write_module('testworker', TEST_WORKER + '\ndef broken(:\n')
    send(master, signal.SIGHUP)
    wait_for(lambda: 'reload failed' in proj.log_text(),
             what='reload failure in the log')
    assert 'worker_class' in proj.log_text()
    doc = proj.status()
    assert doc['master']['pid'] == master
    assert doc['master']['generation'] == 1
    assert proj.running_workers(2) == old
    assert all(alive(p) for p in old.values())
    # fixed: the next HUP replaces them
    proj.write_module('testworker', TEST_WORKER)
    send(master, signal.SIGHUP)
    new = wait_for(lambda: (lambda w: w if w and not set(w.values()) &
                            set(old.values()) else None)(
        proj.running_workers(2)), what='workers replaced after the fix')
    assert set(new) == {1, 2}


def test_hup_with_invalid_config_keeps_old_workers(proj):
    """HUP after the config was made invalid: the master logs the error
    naming the key, keeps running the old workers (same pids) with the old
    settings, and stays controllable."""
    proj.write_config(number_workers=2)
    master = proj.start_daemon()
    old = proj.wait_running(2)
    proj.write_config(number_workers='many')
    send(master, signal.SIGHUP)
    wait_for(lambda: 'reload failed' in proj.log_text(),
             what='reload failure in the log')
    assert 'number_workers' in proj.log_text().split('reload failed')[1]
    assert alive(master)
    assert all(alive(p) for p in old.values())
    # status through another, valid config naming the same pidfile
    other = os.path.join(proj.path, 'other.ini')
    with open(other, 'w') as f:
        f.write('[job]\nworker_class = testworker:Job\npidfile = %s\n'
                % proj.pidfile)
    res = proj.ph('status', '--json', config=other)
    assert res.returncode == 0, res.stderr
    assert str(master) in res.stdout
    proj.write_config(number_workers=2)
    assert proj.running_workers(2) == old
    assert master_doc(proj)['generation'] == 1


# -- 5. max_requests, jitter, interval -----------------------------------------------

def test_max_requests_recycles_in_same_slot(proj):
    """max_requests = 3: each worker process handles at most 3 requests,
    exits gracefully after exactly 3, and is replaced in its slot."""
    proj.write_config(number_workers=2, max_requests=3, run_time=0.02)
    proj.start_daemon()

    def recycled():
        per_slot = {}
        for ev in proj.events('init'):
            per_slot.setdefault(ev[1], set()).add(ev[2])
        return len(per_slot) == 2 and all(
            len(p) >= 3 for p in per_slot.values())
    wait_for(recycled, what='3 processes per slot')
    ends = by_pid(proj.events('run_end'))
    for pid, evs in ends.items():
        counts = [int(ev[4]) for ev in evs]
        assert max(counts) <= 3, (pid, counts)
        assert counts == list(range(1, len(counts) + 1)), (pid, counts)
    finished = proj.events('after_run')
    assert len(finished) >= 4
    for ev in finished:
        assert ev[4] == '3', ev
        assert len(ends[ev[2]]) == 3
    assert set(ev[1] for ev in proj.events('init')) == {1, 2}
    assert 'max_requests reached' in proj.log_text()


def test_max_requests_jitter_per_process_limits(proj):
    """max_requests = 2, jitter = 3: every recycled process handled between
    2 and 5 requests, and the limits differ between processes."""
    proj.write_config(number_workers=2, max_requests=2,
                      max_requests_jitter=3, run_time=0)
    proj.start_daemon()
    wait_for(lambda: len(proj.events('after_run')) >= 16,
             what='16 recycled workers')
    counts = [int(ev[4]) for ev in proj.events('after_run')]
    assert all(2 <= c <= 5 for c in counts), counts
    assert len(set(counts)) >= 2, counts


def test_interval_spaces_runs(proj):
    """interval = 0.3: consecutive runs of a worker start at least 0.3 s
    apart."""
    proj.write_config(number_workers=1, interval=0.3, run_time=0)
    proj.start_daemon()
    wait_for(lambda: len(proj.events('run_end')) >= 5, what='5 runs')
    times = [ev[3] for ev in proj.events('run_end')]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.29, gaps
    assert len(set(ev[2] for ev in proj.events('run_end'))) == 1


# -- 6. exceptions from run() ----------------------------------------------------------

def test_run_exception_logged_with_traceback_loop_goes_on(proj):
    """An exception from run() is logged with its traceback (continuation
    lines prefixed '  | ') and the same worker process keeps looping."""
    proj.write_config(number_workers=1, run_mode='raise', interval=0.05)
    proj.start_daemon()
    first = proj.wait_running(1)
    wait_for(lambda: proj.log_text().count('ValueError: bad job') >= 3,
             what='three logged exceptions')
    assert proj.running_workers(1) == first
    assert len(proj.events('init')) == 1
    records = parse_log(proj.log)           # every line well formed
    raised = [r for r in records if 'run() raised' in r[5]]
    assert len(raised) >= 3
    assert all(r[0] == first[1] and r[3] == 'worker 1' and r[1] == 'ERROR'
               for r in raised)
    lines = proj.log_text().splitlines()
    i = next(i for i, l in enumerate(lines) if 'run() raised' in l)
    tb = []
    for line in lines[i + 1:]:
        if not line.startswith('  | '):
            break
        tb.append(line)
    assert tb[0] == '  | Traceback (most recent call last):', tb
    assert any("raise ValueError('bad job')" in l for l in tb), tb
    assert tb[-1] == '  | ValueError: bad job', tb


# -- 7. init() failure after start: backoff --------------------------------------------

def test_failed_reload_backs_off_keeps_old_worker_then_recovers(proj):
    """A reload whose new workers fail in init(): the slot goes to backoff
    with growing delays (status: state 'backoff', next_attempt_in,
    last_error), few attempts (no fork storm), the old worker keeps serving
    throughout; after fixing the config, HUP brings the slot back."""
    proj.write_config(number_workers=1, version='v1')
    master = proj.start_daemon()
    old = proj.wait_running(1)[1]
    proj.write_config(number_workers=1, init_mode='fail')
    t_hup = time.monotonic()
    send(master, signal.SIGHUP)

    def four_failures():
        doc = proj.status()
        assert doc is not None
        running = [w['pid'] for w in doc['workers']
                   if w['state'] == 'running']
        assert running == [old], doc          # capacity kept throughout
        back = [w for w in doc['workers'] if w['state'] == 'backoff']
        return back and back[0]['failures'] >= 4 and back[0]
    row = wait_for(four_failures, what='4 boot failures')
    elapsed = time.monotonic() - t_hup
    assert row['slot'] == 1 and row['pid'] is None
    assert 'database unreachable' in row['last_error'], row
    assert 0 < row['next_attempt_in'] <= 8.0, row
    # delays 0.5, 1, 2: four attempts cannot fit in less than 3.5 s
    assert elapsed >= 3.5, elapsed
    text = proj.log_text()
    attempts = text.count('init() failed')
    assert row['failures'] <= attempts <= row['failures'] + 1, attempts
    delays = [float(d) for d in re.findall(
        r'worker 1 failed \(.*\); attempt \d+ (?:next )?in ([\d.]+)s', text)]
    assert len(delays) >= 3 and delays == sorted(delays) and \
        delays[0] < delays[-1], delays
    assert alive(old) and proj.events('after_run') == []
    # fix it and HUP: the slot comes back at once, not when the pending
    # backoff (about 4 s now) would have ended
    proj.write_config(number_workers=1, version='v3')
    pending = [w for w in proj.status()['workers']
               if w['state'] == 'backoff'][0]['next_attempt_in']
    t_fix = time.monotonic()
    send(master, signal.SIGHUP)

    def recovered():
        r = proj.running_workers(1)
        if not r or r[1] == old:
            return None
        doc = proj.status()
        if any(w['state'] == 'backoff' for w in doc['workers']):
            return None
        return r[1]
    new = wait_for(recovered, what='slot 1 recovered')
    inits = [ev for ev in proj.events('init') if ev[2] == new]
    assert inits and inits[0][4] == 'v3'
    if pending > 2.0:
        assert inits[0][3] - t_fix < pending - 0.5, (inits[0][3] - t_fix,
                                                     pending)
    wait_for(lambda: not alive(old), what='old worker to stop')
    assert [ev[2] for ev in proj.events('after_run')] == [old]


# -- 8. process titles ---------------------------------------------------------------------

def test_process_titles_master_and_workers(proj):
    """Titles: '<proc_name>: master' and '<proc_name>: worker <slot>' in
    /proc/PID/cmdline (ps -o args) and /proc/PID/comm, also for a
    replacement worker (CPython with setproctitle, PyPy without)."""
    proj.write_config(number_workers=2, proc_name='jobx')
    master = proj.start_daemon()
    workers = proj.wait_running(2)
    assert cmdline(master).strip() == 'jobx: master', cmdline(master)
    assert comm(master) == 'jobx: master'
    for slot, pid in workers.items():
        title = 'jobx: worker %d' % slot
        assert cmdline(pid).strip() == title, cmdline(pid)
        assert comm(pid) == title[:15]
    res = subprocess.run(['ps', '-o', 'args=', '-p', str(master)],
                         stdout=subprocess.PIPE, universal_newlines=True)
    if res.returncode == 0:
        assert res.stdout.strip() == 'jobx: master'
    os.kill(workers[2], signal.SIGKILL)
    new = wait_for(lambda: (lambda w: w if w and w[2] != workers[2] else
                            None)(proj.running_workers(2)))
    assert cmdline(new[2]).strip() == 'jobx: worker 2'
    assert comm(new[2]) == 'jobx: worker 2'


def test_process_title_long_name_truncated_in_comm(proj):
    """A long proc_name: comm holds the first 15 bytes of the title."""
    name = 'a-rather-long-process-name'
    proj.write_config(number_workers=1, proc_name=name)
    master = proj.start_daemon()
    w = proj.wait_running(1)[1]
    assert comm(master) == ('%s: master' % name)[:15]
    assert comm(w) == ('%s: worker 1' % name)[:15]
    assert cmdline(master).strip() == '%s: master' % name
    assert cmdline(w).strip() == '%s: worker 1' % name


# -- 9. subreaper ----------------------------------------------------------------------------

def test_orphaned_grandchildren_adopted_reaped_and_stopped(proj):
    """A worker that starts `sleep 60` and exits: the grandchild is
    re-parented to the master, the worker is reaped (no zombie); a killed
    grandchild is reaped by the master; at stop the remaining grandchild is
    stopped and nothing is left as a zombie."""
    proj.write_config(number_workers=1)
    master = proj.start_daemon()
    proj.wait_running(1)
    # Switch to spawning workers by reload (a worker that dies right
    # after boot while the master starts would be a start failure).
    proj.write_config(number_workers=1, run_mode='spawn')
    send(master, signal.SIGHUP)
    spawned = wait_for(lambda: (lambda s: s if len(s) >= 2 else None)(
        proj.events('spawned')), what='two grandchildren spawned')
    grand = [int(ev[4]) for ev in spawned]
    dead_workers = [ev[2] for ev in spawned]
    proj.workers.update(grand)
    proj.workers.update(dead_workers)
    for g in grand:
        wait_for(lambda: ppid_of(g) == master, what='%d adopted' % g)
        assert proc_state(g) not in (None, 'Z')
    for w in dead_workers:
        wait_for(lambda: proc_state(w) is None, what='worker %d reaped' % w)
    # an adopted grandchild that dies is reaped by the master
    os.kill(grand[0], signal.SIGKILL)
    wait_for(lambda: proc_state(grand[0]) is None,
             what='killed grandchild reaped')
    assert alive(grand[1])
    all_spawned = [int(ev[4]) for ev in proj.events('spawned')]
    proj.workers.update(all_spawned)
    res = proj.ph('stop')
    assert res.returncode == 0, res.stderr
    wait_for(lambda: not alive(master), what='master gone')
    everything = set(all_spawned) | set(
        int(ev[4]) for ev in proj.events('spawned')) | set(
        ev[2] for ev in proj.events())
    for pid in everything:
        wait_for(lambda: proc_state(pid) is None,
                 what='%d gone, not a zombie' % pid)


# -- 10. logging ------------------------------------------------------------------------------

def test_log_lines_well_formed_and_not_interleaved(proj):
    """4 workers logging 2000-character lines at once: every line of the
    log is a whole record (timestamp, [pid], master/worker N) or a '  | '
    continuation; no record is cut, merged or lost."""
    lines, width = 20, 2000
    proj.write_config(number_workers=4, run_mode='log', lines=lines,
                      width=width, run_time=0, interval=0.02)
    master = proj.start_daemon()
    proj.wait_running(4)
    wait_for(lambda: len(by_pid(proj.events('run_end'))) >= 4 and all(
        len(e) >= 5 for e in by_pid(proj.events('run_end')).values()),
        what='5 runs per worker')
    res = proj.ph('stop')
    assert res.returncode == 0, res.stderr
    slot_of = dict((ev[2], ev[1]) for ev in proj.events('init'))
    records = parse_log(proj.log)
    per_pid = {}
    for pid, level, name, tag, slot, msg in records:
        assert name == 'job'
        if tag == 'master':
            assert pid == master, (pid, msg[:80])
            continue
        assert slot_of.get(pid) == slot, (pid, tag)
        if msg.startswith('line '):
            m = re.match(r'^line (\d+) (x+)$', msg)
            assert m and len(m.group(2)) == width, msg[:100]
            per_pid[pid] = per_pid.get(pid, 0) + 1
    assert any(r[3] == 'master' for r in records)
    ends = by_pid(proj.events('run_end'))
    assert set(per_pid) == set(ends)
    for pid, evs in ends.items():
        assert per_pid[pid] == lines * len(evs), (pid, per_pid[pid],
                                                 len(evs))


def test_usr1_reopens_log_in_master_and_workers_nothing_lost(proj):
    """`mv master.log master.log.1` then USR1: master and every worker write
    to a fresh master.log, and every record is in one of the two files."""
    lines = 5
    proj.write_config(number_workers=2, run_mode='log', lines=lines,
                      width=100, run_time=0, interval=0.05)
    master = proj.start_daemon()
    workers = proj.wait_running(2)
    wait_for(lambda: len(proj.events('run_end')) >= 4, what='some runs')
    rotated = proj.log + '.1'
    os.rename(proj.log, rotated)
    send(master, signal.SIGUSR1)

    def fresh_from_all():
        if not os.path.exists(proj.log):
            return False
        pids = set(r[0] for r in parse_log(proj.log))
        return master in pids and set(workers.values()) <= pids
    wait_for(fresh_from_all, what='master and workers in the new log')
    assert 'log file reopened' in proj.log_text()
    n_before = len(proj.events('run_end'))
    wait_for(lambda: len(proj.events('run_end')) >= n_before + 4,
             what='more runs after the reopen')
    res = proj.ph('stop')
    assert res.returncode == 0, res.stderr
    counted = {}
    for path in (rotated, proj.log):
        for r in parse_log(path):
            if r[5].startswith('line '):
                counted[r[0]] = counted.get(r[0], 0) + 1
    ends = by_pid(proj.events('run_end'))
    assert set(counted) == set(ends) == set(workers.values())
    for pid, evs in ends.items():
        assert counted[pid] == lines * len(evs), (pid, counted[pid],
                                                 len(evs))
    # the master's last words went to the new file only
    assert 'master %d exiting' % master in proj.log_text()
    assert 'exiting' not in open(rotated).read()


# -- 11. examples -------------------------------------------------------------------------------

def copy_example(name, dest):
    src = os.path.join(HERE, 'examples', name)
    if not os.path.isdir(src):
        pytest.skip('examples/%s is not there (yet)' % name)
    target = os.path.join(str(dest), name)
    shutil.copytree(src, target, ignore=shutil.ignore_patterns(
        '*.log', '*.pid', '*.pid.*', '*.sock', '__pycache__', '*.pyc'))
    return target


def test_example_jobexecute_daemon(proj):
    """examples/jobexecute (SyncWorker with handle_request) started with its
    own config (daemonize = true): 2 workers running, stops cleanly."""
    folder = copy_example('jobexecute', proj.path)
    config = os.path.join(folder, 'config.ini')
    res = proj.ph('start', config=config)
    assert res.returncode == 0, (res.stdout, res.stderr)
    pidfile = os.path.join(folder, 'master.pid')
    master = proj.master_pid(pidfile)
    proj.masters.add(master)

    def two_running():
        r = proj.ph('status', '--json', config=config)
        if r.returncode != 0:
            return None
        doc = json.loads(r.stdout)
        live = [w for w in doc['workers'] if w['state'] == 'running']
        proj.workers.update(w['pid'] for w in doc['workers'] if w['pid'])
        return len(live) == 2 and doc
    doc = wait_for(two_running, what='2 jobexecute workers')
    assert doc['master']['proc_name'] == 'jobexecute'
    pids = [w['pid'] for w in doc['workers']]
    assert all(ppid_of(p) == master for p in pids)
    assert cmdline(master).strip() == 'jobexecute: master'
    wait_for(lambda: 'go... job' in open(os.path.join(
        folder, 'master.log')).read(), what='a job in the log')
    res = proj.ph('stop', config=config)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: not alive(master) and not any(alive(p) for p in pids),
             what='master and workers gone')
    assert not os.path.exists(pidfile)


def test_example_uliweb_manager_scripts(proj):
    """examples/uliweb/*.py (Manager API) run in the foreground, start
    their workers and stop with TERM: exit 0, nothing left."""
    folder = copy_example('uliweb', proj.path)
    scripts = sorted(p for p in glob.glob(os.path.join(folder, '*.py'))
                     if 'Manager(' in open(p).read())
    if not scripts:
        pytest.skip('no Manager script in examples/uliweb')
    env = dict(os.environ, PYTHONPATH=HERE)
    for script in scripts:
        out = open(os.path.join(proj.path, 'uliweb.out'), 'ab')
        p = subprocess.Popen([PY, script], cwd=folder, env=env,
                             stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT,
                             start_new_session=True)
        out.close()
        proj.popens.append(p)
        proj.masters.add(p.pid)
        kids = wait_for(lambda: [k for k in descendants(p.pid)
                                 if ': worker ' in cmdline(k)],
                        what='%s workers' % os.path.basename(script))
        proj.workers.update(kids)
        assert p.poll() is None
        assert cmdline(p.pid).strip().endswith(': master'), cmdline(p.pid)
        p.send_signal(signal.SIGTERM)
        assert p.wait(DEADLINE) == 0, open(os.path.join(
            proj.path, 'uliweb.out')).read()
        wait_for(lambda: not any(alive(k) for k in kids),
                 what='uliweb workers gone')
