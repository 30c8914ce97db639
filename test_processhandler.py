"""Tests for processhandler: real processes, real signals, observed from
outside (pidfile, ``status --json``, /proc, files the workers write).

Run:  python3 -m pytest test_processhandler.py      (CPython)
      pypy3 -m pytest test_processhandler.py        (PyPy)
or both at once:  bash .ci/test

Every test that starts a master uses the ``proj`` fixture, which kills what
it started by pid and asserts that nothing is left.  Waiting is always
``wait_for`` (poll 10 ms doubling to 0.2 s, up to a deadline), never a fixed
sleep.
"""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import processhandler

HERE = os.path.dirname(os.path.abspath(__file__))
PH = os.path.join(HERE, 'processhandler.py')
PY = sys.executable
IS_PYPY = processhandler.IS_PYPY
# Slow machines (2 cores, PyPy's JIT warm-up) get generous deadlines: a
# deadline only bounds a failure, a passing test returns as soon as it can.
DEADLINE = float(os.environ.get('PH_TEST_DEADLINE', '20'))


# -- helpers -------------------------------------------------------------------

def wait_for(predicate, timeout=DEADLINE, what=None):
    """Poll ``predicate`` (10 ms doubling to 0.2 s) until it returns a true
    value, which is returned; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('timed out after %gs waiting for %s' % (
                timeout, what or getattr(predicate, '__name__', 'condition')))
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def proc_state(pid):
    """One-letter /proc state of ``pid`` ('Z' for a zombie), None if gone."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid):
    """True if ``pid`` exists and is not a zombie."""
    return proc_state(pid) not in (None, 'Z')


def ppid_of(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return f.read().replace(b'\0', b' ').decode('utf-8', 'replace')
    except OSError:
        return ''


def comm(pid):
    try:
        with open('/proc/%d/comm' % pid) as f:
            return f.read().strip()
    except OSError:
        return ''


def descendants(pid):
    """All live descendants of ``pid`` (by walking /proc ppids)."""
    children = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            pp = ppid_of(int(name))
            if pp:
                children.setdefault(pp, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


# A worker module the tests configure through config keys (passed to
# workers as strings).  Every event is one O_APPEND write of one line to
# events.log: "<event> <slot> <pid> <monotonic> <extra>".
TEST_WORKER = '''
import os, sys, time, signal
import processhandler

def event(worker, name, extra=''):
    line = '%s %s %d %.6f %s\\n' % (name, worker.slot, os.getpid(),
                                    time.monotonic(), extra)
    fd = os.open(os.path.join(worker.cfg.base_path, 'events.log'),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)

class Job(processhandler.Worker):
    def init(self):
        mode = self.cfg.get('init_mode', '')
        if mode == 'fail':
            raise RuntimeError('database unreachable')
        if mode == 'slow':
            time.sleep(float(self.cfg.get('init_time', '0.5')))
        event(self, 'init', self.cfg.get('version', 'v1'))

    def run(self):
        mode = self.cfg.get('run_mode', 'sleep')
        t = float(self.cfg.get('run_time', '0.05'))
        if mode == 'raise':
            raise ValueError('bad job')
        if mode == 'print':
            print('hello from print %d' % self.slot)
            sys.stdout.flush()
        if mode == 'log':
            for i in range(int(self.cfg.get('lines', '10'))):
                self.log.info('line %d %s', i, 'x' * int(self.cfg.get('width', '100')))
        if mode == 'spawn':
            import subprocess
            p = subprocess.Popen(['sleep', '60'])
            event(self, 'spawned', str(p.pid))
            os._exit(1)
        if t:
            event(self, 'run_start')
            time.sleep(t)
        event(self, 'run_end', str(self.requests + 1))
        return True

    def after_run(self):
        event(self, 'after_run', str(self.requests))
'''


class Project(object):
    """A folder with config.ini and worker code, and the processes started
    from it (tracked by pid for cleanup)."""

    def __init__(self, path):
        self.path = str(path)
        self.config = os.path.join(self.path, 'config.ini')
        self.pidfile = os.path.join(self.path, 'master.pid')
        self.log = os.path.join(self.path, 'master.log')
        self.events_path = os.path.join(self.path, 'events.log')
        self.masters = set()
        self.workers = set()
        self.popens = []
        self.write_module('testworker', TEST_WORKER)

    # -- files ---------------------------------------------------------------

    def write_module(self, name, source):
        with open(os.path.join(self.path, name + '.py'), 'w') as f:
            f.write(textwrap.dedent(source))

    def write_config(self, section='job', text=None, **keys):
        """Write config.ini: [section] with defaults for tests + ``keys``."""
        if text is None:
            values = dict(worker_class='testworker:Job', number_workers=2,
                          pidfile=self.pidfile, log_file=self.log,
                          graceful_timeout=5)
            values.update(keys)
            text = '[%s]\n' % section + ''.join(
                '%s = %s\n' % kv for kv in values.items() if kv[1] is not None)
        with open(self.config, 'w') as f:
            f.write(text)
        return self.config

    def events(self, kind=None):
        """[(event, slot, pid, t, extra)] from events.log."""
        try:
            with open(self.events_path) as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            parts = line.split(' ', 4)
            ev = (parts[0], int(parts[1]), int(parts[2]), float(parts[3]),
                  parts[4] if len(parts) > 4 else '')
            if kind is None or ev[0] == kind:
                out.append(ev)
        return out

    def log_text(self):
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ''

    # -- commands ------------------------------------------------------------

    def ph(self, *args, **kw):
        """Run the CLI; return CompletedProcess (text)."""
        cmd = [kw.pop('python', PY), PH, '-c', kw.pop('config', self.config)]
        cmd += list(args)
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, cwd=self.path,
                             timeout=kw.pop('timeout', 60), **kw)
        return res

    def start_daemon(self, *args):
        res = self.ph('start', '-d', *args)
        assert res.returncode == 0, (res.stdout, res.stderr, self.log_text())
        pid = self.master_pid()
        self.masters.add(pid)
        return pid

    def start_foreground(self, *args, **kw):
        """Start a foreground master in a new session, output to a file."""
        out = open(os.path.join(self.path, 'fg.out'), 'ab')
        cmd = [kw.pop('python', PY), PH, '-c', self.config, '-f'] + list(args)
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, cwd=self.path,
                             start_new_session=True, **kw)
        out.close()
        self.popens.append(p)
        self.masters.add(p.pid)
        return p

    def fg_output(self):
        try:
            with open(os.path.join(self.path, 'fg.out')) as f:
                return f.read()
        except OSError:
            return ''

    def master_pid(self, pidfile=None):
        with open(pidfile or self.pidfile) as f:
            return int(f.read().strip())

    def status(self, *args):
        res = self.ph('status', '--json', *args)
        if res.returncode != 0:
            return None
        doc = json.loads(res.stdout)
        for w in doc.get('workers', []):
            if w.get('pid'):
                self.workers.add(w['pid'])
        return doc

    def running_workers(self, n=None):
        """Pids of running workers by slot, when there are ``n`` of them."""
        doc = self.status()
        if doc is None:
            return None
        rows = [w for w in doc['workers'] if w['state'] == 'running']
        if n is not None and len(rows) != n:
            return None
        return dict((w['slot'], w['pid']) for w in rows)

    def wait_running(self, n, timeout=DEADLINE):
        return wait_for(lambda: self.running_workers(n), timeout,
                        '%d running workers' % n)

    # -- cleanup ---------------------------------------------------------------

    def cleanup(self):
        """Kill every process we started (by pid); return the leftovers."""
        tracked = set(self.masters) | set(self.workers)
        for pid in list(self.masters):
            tracked.update(descendants(pid))
        for pid in self.masters:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        try:
            wait_for(lambda: not any(alive(p) for p in tracked), 10)
        except AssertionError:
            pass
        left = [p for p in tracked if alive(p)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for p in self.popens:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        return left


@pytest.fixture
def proj(tmp_path):
    p = Project(tmp_path)
    try:
        yield p
    finally:
        left = p.cleanup()
    assert not left, 'processes left behind: %s' % left


def assert_one_line_error(res, *needles):
    """A usage/config error: exit 2, exactly one line on stderr, no
    traceback, mentioning every needle."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(lines) == 1, res.stderr
    assert 'Traceback' not in res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


# -- lifecycle -----------------------------------------------------------------

def test_daemon_start_status_stop(proj):
    proj.write_config()
    res = proj.ph('start', '-d')
    assert res.returncode == 0, res.stderr
    assert 'started' in res.stdout
    master = proj.master_pid()
    proj.masters.add(master)
    workers = proj.wait_running(2)
    assert set(workers) == {1, 2}
    for pid in workers.values():
        assert ppid_of(pid) == master
    doc = proj.status()
    assert doc['master']['pid'] == master
    assert doc['master']['state'] == 'active'
    assert doc['master']['section'] == 'job'
    for w in doc['workers']:
        assert set(w) >= {'slot', 'pid', 'state', 'requests', 'rss_mb', 'age'}
        assert w['rss_mb'] > 1
    text = proj.ph('status')
    assert text.returncode == 0 and str(master) in text.stdout
    res = proj.ph('stop')
    assert res.returncode == 0, res.stderr
    assert not alive(master)
    assert not any(alive(p) for p in workers.values())
    assert not os.path.exists(proj.pidfile)
    assert proj.ph('status').returncode == 3
    assert proj.ph('stop').returncode == 0


def test_killed_worker_is_replaced_in_same_slot(proj):
    proj.write_config(number_workers=3)
    proj.start_daemon()
    before = proj.wait_running(3)
    os.kill(before[2], signal.SIGKILL)
    after = wait_for(lambda: (lambda w: w if w and w[2] != before[2] else
                              None)(proj.running_workers(3)))
    assert after[1] == before[1] and after[3] == before[3]
    assert after[2] != before[2]
    assert proc_state(before[2]) is None      # reaped, not a zombie


def test_graceful_term_finishes_current_run(proj):
    proj.write_config(number_workers=1, run_time=1.0)
    p = proj.start_foreground()
    wait_for(lambda: proj.events('run_start'))
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(DEADLINE) == 0
    starts = proj.events('run_start')
    ends = proj.events('run_end')
    assert len(ends) == len(starts)           # the run in flight finished
    assert proj.events('after_run')


def test_master_killed_workers_exit_within_one_second(proj):
    proj.write_config(number_workers=3, run_time=5)
    master = proj.start_daemon()
    workers = proj.wait_running(3)
    os.kill(master, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: not any(alive(p) for p in workers.values()), 5)
    assert time.monotonic() - t0 < 1.0


# -- documentation and API -------------------------------------------------------

def test_readme_config_table_is_generated_from_settings():
    """The README's config table is SETTINGS rendered: one source."""
    with open(os.path.join(HERE, 'README.md')) as f:
        readme = f.read()
    assert processhandler.settings_table() in readme


def test_readme_first_commands_are_the_tested_ones():
    with open(os.path.join(HERE, 'README.md')) as f:
        head = f.read().split('## Writing a worker')[0]
    assert 'python3 processhandler.py -c examples/jobexecute/config.ini' in head
    assert 'bash .ci/test' in head
    with open(os.path.join(HERE, '.ci', 'run')) as f:
        assert 'bash .ci/test' in f.read()


def test_file_leader_lock_active_standby(proj, tmp_path):
    """leader_lock = file:...: one master active, the other on standby;
    stopping the active one hands over at once."""
    lock = os.path.join(proj.path, 'leader.lock')
    proj.write_config(leader_lock='file:' + lock, pidfile=proj.pidfile)
    first = proj.start_daemon()
    proj.wait_running(2)
    second_cfg = os.path.join(proj.path, 'second.ini')
    second_pid = os.path.join(proj.path, 'second.pid')
    with open(proj.config) as f:
        text = f.read().replace(proj.pidfile, second_pid)
    with open(second_cfg, 'w') as f:
        f.write(text)
    res = proj.ph('start', '-d', config=second_cfg)
    assert res.returncode == 0 and 'standby' in res.stdout, res.stdout
    second = proj.master_pid(second_pid)
    proj.masters.add(second)
    doc = json.loads(proj.ph('status', '--json', config=second_cfg).stdout)
    assert doc['master']['state'] == 'standby' and doc['workers'] == []
    assert proj.status()['master']['state'] == 'active'
    assert proj.ph('stop').returncode == 0
    assert not alive(first)

    def second_active():
        d = json.loads(proj.ph('status', '--json', config=second_cfg).stdout)
        running = [w for w in d['workers'] if w['state'] == 'running']
        return d['master']['state'] == 'active' and len(running) == 2
    wait_for(second_active)


def test_workers_drop_privileges_to_user(proj):
    """As root, user/group apply in the workers; the master keeps root."""
    if os.getuid() != 0:
        pytest.skip('needs root')
    import pwd
    nobody = pwd.getpwnam('nobody')
    proj.write_config(user='nobody', run_time=0)
    os.chmod(proj.path, 0o755)
    proj.write_module('quiet', '''
        import time, processhandler
        class Quiet(processhandler.Worker):
            def run(self):
                time.sleep(0.05)
                return True
    ''')
    proj.write_config(user='nobody', worker_class='quiet:Quiet')
    master = proj.start_daemon()
    workers = proj.wait_running(2)

    def uid(pid):
        with open('/proc/%d/status' % pid) as f:
            return int([l for l in f if l.startswith('Uid:')][0].split()[1])
    assert uid(master) == 0
    assert all(uid(p) == nobody.pw_uid for p in workers.values())
