#!/usr/bin/env python3
"""Benchmarks of processhandler against multiprocessing.Pool, gunicorn, circus
and supervisor, side by side in one run (issue 6; issue 4 for the socket path).

    python3 bench/run.py                 # full run (< 10 min), writes RESULTS.md
    python3 bench/run.py --quick         # fewer trials (< 2 min)
    python3 bench/run.py --smoke         # seconds: only proves the harness runs
    python3 bench/run.py --python pypy3  # processhandler on PyPy only
    python3 bench/run.py --systems processhandler,pool
    python3 bench/run.py --svg-only      # redraw results.svg from RESULTS.md

Standard library only.  The peers are used from bench/.venv when it exists
(see bench/README.md).  Every process started here is tracked by pid (and
start time, against pid reuse) and killed on exit, Ctrl-C or error.
"""
import argparse
import ctypes
import datetime
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PH = os.path.join(ROOT, 'processhandler.py')
AGENTS = os.path.join(HERE, 'agents.py')
VENV_BIN = os.path.join(HERE, '.venv', 'bin')
RESULTS = os.path.join(HERE, 'RESULTS.md')
CHART = os.path.join(HERE, 'results.svg')
CLK_TCK = os.sysconf('SC_CLK_TCK')
INF = float('inf')


def log(msg):
    sys.stderr.write('[%7.1fs] %s\n' % (time.monotonic() - T_START, msg))
    sys.stderr.flush()


T_START = time.monotonic()


# =============================================================================
# /proc helpers and process bookkeeping
# =============================================================================

def _stat(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return None


def starttime(pid):
    s = _stat(pid)
    return int(s[19]) if s else None


def alive(pid):
    """Exists and is not a zombie."""
    s = _stat(pid)
    return s is not None and s[0] not in ('Z', 'X')


def descendants(pid):
    kids = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            s = _stat(int(name))
            if s:
                kids.setdefault(int(s[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def proc_status(pid, key):
    try:
        with open('/proc/%d/status' % pid) as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cpu_and_switches(pid):
    """(CPU ns, context switches) of every thread of ``pid``: schedstat's
    on-CPU nanoseconds (utime+stime from /proc/PID/stat, 10 ms ticks, when
    schedstat is missing) and voluntary + nonvoluntary context switches."""
    ns = switches = 0
    try:
        tids = os.listdir('/proc/%d/task' % pid)
    except OSError:
        return None
    for tid in tids:
        base = '/proc/%d/task/%s/' % (pid, tid)
        try:
            with open(base + 'schedstat') as f:
                ns += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            try:
                with open(base + 'stat') as f:
                    s = f.read().rsplit(')', 1)[1].split()
                ns += (int(s[11]) + int(s[12])) * 10 ** 9 // CLK_TCK
            except (OSError, ValueError, IndexError):
                pass
        try:
            with open(base + 'status') as f:
                for line in f:
                    if 'ctxt_switches' in line:
                        switches += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return ns, switches


def pss_kb(pid):
    try:
        with open('/proc/%d/smaps_rollup' % pid) as f:
            for line in f:
                if line.startswith('Pss:'):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class Tracker(object):
    """Every process the bench started or saw: killed by pid at the end."""

    def __init__(self):
        self.known = {}        # pid -> start time
        self.popens = []
        self.lock = threading.Lock()

    def add(self, pid):
        st = starttime(pid)
        if st is not None:
            with self.lock:
                self.known.setdefault(pid, st)

    def popen(self, cmd, **kw):
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                             start_new_session=True, **kw)
        self.popens.append(p)
        self.add(p.pid)
        return p

    def same(self, pid):
        st = self.known.get(pid)
        return st is not None and starttime(pid) == st

    def kill(self, pids, sig=signal.SIGKILL):
        for pid in pids:
            if self.same(pid) and alive(pid):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass

    def reap(self, pids=None):
        """Reap those of ``pids`` that became our children (subreaper)."""
        for pid in list(pids if pids is not None else self.known):
            try:
                os.waitpid(pid, os.WNOHANG)
            except (ChildProcessError, OSError):
                pass

    def kill_tree(self, roots):
        pids = set(roots)
        for r in roots:
            if self.same(r):
                for d in descendants(r):
                    self.add(d)
                    pids.add(d)
        self.kill(pids)
        return pids

    def cleanup(self):
        roots = [p.pid for p in self.popens if p.poll() is None]
        self.kill_tree(roots)
        self.kill(list(self.known))
        for p in self.popens:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.reap()
        self.popens = [p for p in self.popens if p.returncode is None]


TRACK = Tracker()


def become_subreaper():
    """Orphans of a killed master come to us (and can be reaped) instead of
    to a pid 1 that may never reap them."""
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


# =============================================================================
# Events: the workers' stamps, through a FIFO, read by a thread
# =============================================================================

class Events(object):
    """A FIFO the user code writes ``KIND PID T EXTRA`` lines into."""

    def __init__(self, path):
        self.path = path
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDWR)
        self.items = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        buf = b''
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            lines = buf.split(b'\n')
            buf = lines.pop()
            new = []
            for line in lines:
                parts = line.decode().split(' ', 3)
                if parts[0] == 'quit':
                    with self.cond:
                        self.cond.notify_all()
                    return
                pid = int(parts[1])
                TRACK.add(pid)
                new.append((parts[0], pid, float(parts[2]),
                            parts[3] if len(parts) > 3 else ''))
            with self.cond:
                self.items.extend(new)
                self.cond.notify_all()

    def wait(self, predicate, timeout):
        """Wait until predicate(items) is true; return its value or None."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                v = predicate(self.items)
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def of(self, kind):
        with self.cond:
            return [e for e in self.items if e[0] == kind]

    def close(self):
        try:
            os.write(self.fd, b'quit 0 0\n')
        except OSError:
            pass
        self.thread.join(2)
        os.close(self.fd)


# =============================================================================
# Systems
# =============================================================================

class Instance(object):
    """One running master (of any system) and its workers."""

    def __init__(self, system, tmp, popen, events, t_launch):
        self.system = system
        self.tmp = tmp
        self.popen = popen
        self.master = popen.pid
        self.events = events
        self.t_launch = t_launch
        self.closed = False

    def boots(self):
        return self.events.of('boot')

    def wait_boots(self, n, timeout=60, after=0.0):
        def enough(items):
            b = [e for e in items if e[0] == 'boot' and e[2] >= after]
            return b if len(b) >= n else None
        got = self.events.wait(enough, timeout)
        if got is None:
            if self.popen.poll() is not None:
                raise RuntimeError('%s exited with %s before %d workers ran '
                                   '(see %s)' % (self.system.label,
                                                 self.popen.returncode, n,
                                                 self.tmp))
            raise RuntimeError('%s: %d of %d workers ran after %ss (see %s)'
                               % (self.system.label, len(self.boots()), n,
                                  timeout, self.tmp))
        return got[:n]

    def live_workers(self):
        """[(boot time, pid)] of workers that ran user code and are alive."""
        seen = {}
        for e in self.boots():
            seen[e[1]] = e[2]
        return sorted((t, pid) for pid, t in seen.items()
                      if pid != self.master and alive(pid))

    def all_pids(self):
        pids = set(e[1] for e in self.events.items) | {self.master}
        if alive(self.master):
            pids.update(descendants(self.master))
        for p in pids:
            TRACK.add(p)
        return pids

    def close(self, graceful=True, wait=8.0):
        if self.closed:
            return
        self.closed = True
        pids = self.all_pids()
        try:
            if graceful and self.popen.poll() is None:
                os.kill(self.master, signal.SIGTERM)
                try:
                    self.popen.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            TRACK.kill(pids | set(self.all_pids()))
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
            TRACK.reap(pids)
            self.events.close()


class System(object):
    name = label = ''
    python = sys.executable
    available = True
    why_not = ''

    def __init__(self, opts):
        self.opts = opts
        self.count = 0

    def workdir(self):
        self.count += 1
        d = os.path.join(self.opts.tmp, '%s-%d' % (self.name, self.count))
        os.makedirs(d)
        return d

    def env(self, events):
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join([HERE, ROOT])
        env['BENCH_EVENTS'] = events
        env.pop('PYTHONSTARTUP', None)
        return env

    def launch(self, n, mode='idle', max_requests=0, **extra):
        d = self.workdir()
        events = Events(os.path.join(d, 'events.fifo'))
        try:
            t0 = time.monotonic()
            p = self.start(d, events.path, n, mode, max_requests, extra)
        except BaseException:
            events.close()
            raise
        return Instance(self, d, p, events, t0)

    def popen(self, cmd, d, events):
        out = open(os.path.join(d, 'stdout.log'), 'wb')
        try:
            return TRACK.popen(cmd, cwd=d, env=self.env(events), stdout=out,
                               stderr=subprocess.STDOUT)
        finally:
            out.close()


class ProcessHandler(System):
    def __init__(self, opts, python):
        System.__init__(self, opts)
        self.python = python
        self.version = interpreter_version(python)
        impl = 'PyPy' if 'PyPy' in self.version else 'CPython'
        self.name = 'ph-' + impl.lower()
        self.label = 'processhandler (%s)' % impl
        self.impl = impl

    def config(self, d, events, n, worker, max_requests, extra):
        keys = dict(worker_class='agents:' + worker, number_workers=n,
                    pidfile=os.path.join(d, 'master.pid'),
                    log_file=os.path.join(d, 'master.log'),
                    graceful_timeout=5, events=events)
        if max_requests:
            keys['max_requests'] = max_requests
        keys.update(extra)
        path = os.path.join(d, 'config.ini')
        with open(path, 'w') as f:
            f.write('[bench]\n' + ''.join('%s = %s\n' % kv
                                          for kv in keys.items()))
        return path

    def start(self, d, events, n, mode, max_requests, extra):
        worker = {'idle': 'Idle', 'recycle': 'Spin', 'loop': 'Spin',
                  'echo': 'Echo'}[mode]
        cfg = self.config(d, events, n, worker, max_requests, extra)
        return self.popen([self.python, PH, '-c', cfg, '-f'], d, events)

    def status(self, inst):
        import json
        res = subprocess.run(
            [self.python, PH, '-c', os.path.join(inst.tmp, 'config.ini'),
             'status', '--json'], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60,
            env=self.env(inst.events.path))
        return json.loads(res.stdout) if res.returncode == 0 else None


class Pool(System):
    name = 'pool'
    label = 'multiprocessing.Pool'

    def __init__(self, opts):
        System.__init__(self, opts)
        self.python = sys.executable

    def start(self, d, events, n, mode, max_requests, extra):
        assert mode == 'idle'
        return self.popen([self.python, AGENTS, 'pool', 'idle', str(n),
                           events], d, events)


def venv_tool(name):
    path = os.path.join(VENV_BIN, name)
    if os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    return found


def venv_python():
    path = os.path.join(VENV_BIN, 'python')
    return path if os.access(path, os.X_OK) else sys.executable


class Peer(System):
    tool = ''

    def __init__(self, opts):
        System.__init__(self, opts)
        self.exe = venv_tool(self.tool)
        self.python = venv_python()
        if not self.exe:
            self.available = False
            self.why_not = ('%s is not installed (python3 -m venv bench/.venv'
                            ' && bench/.venv/bin/pip install gunicorn circus '
                            'supervisor)' % self.name)
        self.version = ''
        if self.available:
            try:
                out = subprocess.run(
                    [self.python, '-c', 'import importlib.metadata as m; '
                     'print(m.version(%r))' % self.name],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    universal_newlines=True, timeout=30).stdout.strip()
                self.version = out
            except Exception:
                pass

    def program(self, events, mode, max_requests):
        if mode == 'idle':
            return [self.python, AGENTS, 'peer', 'idle', events]
        return [self.python, AGENTS, 'peer', 'recycle', str(max_requests),
                events]


class Gunicorn(Peer):
    name = tool = 'gunicorn'
    label = 'gunicorn'

    def start(self, d, events, n, mode, max_requests, extra):
        self.port = free_port()
        conf = os.path.join(d, 'gunicorn.conf.py')
        with open(conf, 'w') as f:
            f.write('from agents import gunicorn_hook as post_worker_init\n'
                    'bind = "127.0.0.1:%d"\nworkers = %d\nmax_requests = %d\n'
                    'worker_class = "sync"\nloglevel = "warning"\n'
                    'errorlog = %r\n' % (self.port, n, max_requests,
                                         os.path.join(d, 'gunicorn.log')))
        return self.popen([self.exe, '-c', conf, 'agents:app'], d, events)


class Circus(Peer):
    name = tool = 'circus'
    label = 'circus'

    def __init__(self, opts):
        self.tool = 'circusd'
        Peer.__init__(self, opts)

    def start(self, d, events, n, mode, max_requests, extra):
        ini = os.path.join(d, 'circus.ini')
        prog = self.program(events, mode, max_requests)
        with open(ini, 'w') as f:
            f.write('[circus]\nendpoint = ipc://%(d)s/ctl.sock\n'
                    'pubsub_endpoint = ipc://%(d)s/pub.sock\n'
                    'stats_endpoint = ipc://%(d)s/stats.sock\n'
                    'statsd = false\nloglevel = WARNING\n'
                    'logoutput = %(d)s/circus.log\n\n'
                    '[watcher:bench]\ncmd = %(cmd)s\nargs = %(args)s\n'
                    'numprocesses = %(n)d\ncheck_flapping = false\n'
                    'copy_env = true\n' % dict(
                        d=d, cmd=prog[0], args=' '.join(prog[1:]), n=n))
        return self.popen([self.exe, ini], d, events)


class Supervisor(Peer):
    name = 'supervisor'
    label = 'supervisor'

    def __init__(self, opts):
        self.tool = 'supervisord'
        Peer.__init__(self, opts)

    def start(self, d, events, n, mode, max_requests, extra):
        conf = os.path.join(d, 'supervisord.conf')
        prog = self.program(events, mode, max_requests)
        with open(conf, 'w') as f:
            f.write('[supervisord]\nnodaemon = true\nlogfile = %(d)s/sd.log\n'
                    'pidfile = %(d)s/sd.pid\nchildlogdir = %(d)s\n'
                    'loglevel = warn\n\n'
                    '[program:bench]\ncommand = %(cmd)s\nnumprocs = %(n)d\n'
                    'process_name = %%(program_name)s_%%(process_num)03d\n'
                    'startsecs = 0\nautorestart = true\n'
                    'startretries = 1000000\nstdout_logfile = NONE\n'
                    'stderr_logfile = NONE\nstopwaitsecs = 5\n' % dict(
                        d=d, cmd=' '.join(prog), n=n))
        return self.popen([self.exe, '-n', '-c', conf], d, events)


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def interpreter_version(python):
    try:
        out = subprocess.run(
            [python, '-c', 'import sys, platform; print("%s %s" % ('
             'platform.python_implementation(), sys.version.split()[0]))'],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            universal_newlines=True, timeout=60).stdout.strip()
        return out or python
    except Exception:
        return python


# =============================================================================
# Results
# =============================================================================

class Table(object):
    """metric -> system -> list of samples (or a reason string: n/a)."""

    def __init__(self):
        self.rows = []          # (key, title, unit, higher_is_better)
        self.data = {}
        self.na = {}
        self.methods = {}

    def row(self, key, title, unit, method):
        if key not in self.data:
            self.rows.append((key, title, unit))
            self.data[key] = {}
            self.na[key] = {}
        self.methods[key] = method

    def add(self, key, system, value):
        self.data[key].setdefault(system, []).append(value)

    def not_applicable(self, key, system, why):
        self.na[key][system] = why

    def samples(self, key, system):
        return self.data.get(key, {}).get(system, [])

    def median(self, key, system):
        s = [v for v in self.samples(key, system)]
        return statistics.median(s) if s else None


def fmt_value(v, unit):
    if v == INF:
        return 'never'
    if unit == 's':
        if v < 1e-3:
            return '%.0f µs' % (v * 1e6)
        if v < 1:
            return '%.3g ms' % (v * 1e3)
        return '%.3g s' % v
    if unit == '/s':
        if v >= 1e9:
            return '%.3g G/s' % (v / 1e9)
        if v >= 1e5:
            return '%.3g M/s' % (v / 1e6) if v >= 1e6 else '%.0f k/s' % (
                v / 1e3)
        return '%.3g/s' % v if v < 100 else '%.0f/s' % v
    if unit == 'x':
        return '%.2f' % v if v >= 0.1 else '%.2g' % v
    if unit == 'ns':
        return '%.0f ns' % v if v < 1e4 else '%.0f µs' % (v / 1e3)
    if unit == 'MB':
        return '%.1f MB' % v
    if unit == 'ms/min':
        return '%.2g ms/min' % v if v < 10 else '%.0f ms/min' % v
    return '%.3g %s' % (v, unit)


def fmt_cell(samples, unit):
    if not samples:
        return ''
    med = statistics.median(samples)
    cell = fmt_value(med, unit)
    if len(samples) > 1:
        lo, hi = min(samples), max(samples)
        if lo != hi:
            a, b = fmt_value(lo, unit), fmt_value(hi, unit)
            cell += ' (%s–%s)' % (a, b)
    return cell


def render(table, systems):
    cols = [s for s in systems]
    header = ['metric'] + [s.label for s in cols]
    lines = []
    notes = []
    for key, title, unit in table.rows:
        row = [title]
        for s in cols:
            samples = table.samples(key, s.name)
            if samples:
                row.append(fmt_cell(samples, unit))
            else:
                why = table.na[key].get(s.name) or (
                    s.why_not if not s.available else 'not measured')
                for i, (who, reason) in enumerate(notes, 1):
                    if (who, reason) == (s.label, why):
                        break
                else:
                    notes.append((s.label, why))
                    i = len(notes)
                row.append('n/a [%d]' % i)
        lines.append(row)
    widths = [max(len(r[i]) for r in [header] + lines)
              for i in range(len(header))]

    def md(r):
        return '| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + \
            ' |'
    out = [md(header), '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
    out += [md(r) for r in lines]
    return '\n'.join(out), notes


# =============================================================================
# Metrics
# =============================================================================

def close_all(insts):
    for inst in insts:
        try:
            inst.close()
        except Exception as e:
            log('cleanup of %s: %s' % (inst.system.label, e))


def bench_respawn(opts, systems, table):
    key = 'respawn'
    table.row(key, 'respawn latency', 's',
              'SIGKILL an idle worker (4 workers per system, the oldest one, '
              'at least 1.2 s old), time from the kill (harness '
              'CLOCK_MONOTONIC) to the replacement\'s stamp written in user '
              'code (processhandler init(), Pool initializer, gunicorn '
              'post_worker_init, the program\'s first line for circus and '
              'supervisor); %d kills per system, round-robin, at most one '
              'kill in flight among the fast systems; a system whose first '
              'replacement took over 0.3 s is killed in parallel with the '
              'others, within a budget of %g s (so it may get fewer kills).'
              % (opts.kills, opts.respawn_budget))
    insts = {}
    try:
        for s in systems:
            try:
                inst = insts[s.name] = s.launch(4)
                inst.wait_boots(4, timeout=opts.start_timeout)
            except Exception as e:
                table.not_applicable(key, s.name, 'did not start: %s' % e)
                insts.pop(s.name, None)
        done = dict((name, 0) for name in insts)
        pending = {}            # name -> (t_kill, victim)
        slow = set()
        order = [s for s in systems if s.name in insts]
        deadline = time.monotonic() + opts.respawn_budget
        while any(n < opts.kills for n in done.values()) or pending:
            now = time.monotonic()
            for s in order:
                inst = insts[s.name]
                if s.name in pending:
                    t_kill, victim = pending[s.name]
                    got = [e for e in inst.boots()
                           if e[2] > t_kill and e[1] != victim]
                    if got or now - t_kill > opts.respawn_timeout:
                        del pending[s.name]
                        lat = got[0][2] - t_kill if got else INF
                        table.add(key, s.name, lat)
                        if lat > 0.3:
                            slow.add(s.name)
                    continue
                if done[s.name] >= opts.kills or now > deadline:
                    continue
                if s.name not in slow and any(n not in slow
                                              for n in pending):
                    continue
                live = inst.live_workers()
                if not live or now - live[0][0] < 1.2:
                    continue
                victim = live[0][1]
                t_kill = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                pending[s.name] = (t_kill, victim)
                done[s.name] += 1
            if now > deadline and not pending:
                break
            time.sleep(0.002)
    finally:
        close_all(insts.values())


def bench_idle(opts, systems, table):
    cpu, wake = 'idle-cpu', 'idle-wake'
    method = ('16 idle workers; after all ran user code and a 2 s settle, '
              'the master\'s (every thread\'s) on-CPU time from '
              '/proc/PID/task/*/schedstat and voluntary+nonvoluntary context '
              'switches from /proc/PID/task/*/status, over %g s split in %d '
              'intervals (one value per interval); all systems idle at '
              'the same time.  Master = the processhandler master, the '
              'process owning the Pool, gunicorn\'s arbiter, circusd, '
              'supervisord.' % (opts.idle_window, opts.idle_parts))
    table.row(cpu, 'idle master CPU (16 workers)', 'ms/min', method)
    table.row(wake, 'idle master wake-ups (16 workers)', '/s', method)
    insts = {}
    try:
        for s in systems:
            try:
                inst = insts[s.name] = s.launch(16)
                inst.wait_boots(16, timeout=120)
            except Exception as e:
                for k in (cpu, wake):
                    table.not_applicable(k, s.name, 'did not start: %s' % e)
                insts.pop(s.name, None)
        time.sleep(2.0)
        part = opts.idle_window / opts.idle_parts
        prev = dict((n, (time.monotonic(), cpu_and_switches(i.master)))
                    for n, i in insts.items())
        for _ in range(opts.idle_parts):
            time.sleep(part)
            for n, inst in insts.items():
                now, sample = time.monotonic(), cpu_and_switches(inst.master)
                t0, s0 = prev[n]
                prev[n] = (now, sample)
                if sample is None or s0 is None:
                    continue
                dt = now - t0
                table.add(cpu, n, (sample[0] - s0[0]) / 1e6 / dt * 60)
                table.add(wake, n, (sample[1] - s0[1]) / dt)
    finally:
        close_all(insts.values())


def bench_startup(opts, systems, table, n, key, title, trials, scale=False):
    table.row(key, title, 's',
              'launch command (harness CLOCK_MONOTONIC just before the '
              'fork/exec of the master) to the last of %d workers\' stamps '
              'written in user code; %d trial(s) per system, round-robin.'
              % (n, trials))
    if scale:
        table.row('scale-rss', 'scale: master RSS (%d workers)' % n, 'MB',
                  'VmRSS of the master from /proc/PID/status once all %d '
                  'workers ran user code (+1 s).' % n)
        table.row('scale-pss', 'scale: PSS per worker (%d workers)' % n,
                  'MB', 'mean Pss from /proc/PID/smaps_rollup over the %d '
                  'workers (copy-on-write sharing counted once, split '
                  'between sharers).' % n)
    spent = {}
    for trial in range(trials):
        for s in systems:
            if opts.quick and isinstance(s, Peer):
                for k in (key, 'scale-rss', 'scale-pss') if scale else (key,):
                    table.not_applicable(k, s.name, 'skipped in --quick '
                                         '(slow to start %d workers)' % n)
                continue
            if scale and isinstance(s, Peer):
                m64 = table.median('startup', s.name)  # 64 workers
                if m64 is None or m64 > 15:
                    for k in (key, 'scale-rss', 'scale-pss'):
                        table.not_applicable(k, s.name, 'skipped: 64 '
                                             'workers took %s, 256 would '
                                             'not fit in the run\'s time' % (
                                                 fmt_value(m64, 's') if m64
                                                 else 'n/a'))
                    continue
            if over_budget(opts, spent, s, trial):
                continue
            t_sys = time.monotonic()
            inst = None
            try:
                inst = s.launch(n)
                boots = inst.wait_boots(n, timeout=opts.start_timeout)
                table.add(key, s.name, max(e[2] for e in boots) -
                          inst.t_launch)
                if scale:
                    time.sleep(1.0)
                    rss = proc_status(inst.master, 'VmRSS')
                    if rss:
                        table.add('scale-rss', s.name, rss / 1024.0)
                    pss = [pss_kb(pid) for _, pid in inst.live_workers()]
                    pss = [p for p in pss if p]
                    if pss:
                        table.add('scale-pss', s.name,
                                  sum(pss) / len(pss) / 1024.0)
            except Exception as e:
                log('start-up %d: %s: %s' % (n, s.label, e))
                table.not_applicable(key, s.name, 'failed: %s' % e)
            finally:
                if inst is not None:
                    inst.close()
                spent[s.name] = spent.get(s.name, 0) + \
                    time.monotonic() - t_sys


def over_budget(opts, spent, s, trial):
    """After the first trial, a system that already used its share of the
    run's time for this metric gets no more trials."""
    return trial > 0 and spent.get(s.name, 0) > opts.system_budget


def bench_stop(opts, systems, table):
    key = 'stop'
    table.row(key, 'stop (TERM, 16 workers)', 's',
              '16 idle workers; SIGTERM to the master; time until the master '
              'has exited and every worker is gone (exited or a zombie), '
              'polled every 1 ms; %d trial(s), round-robin.' % opts.trials)
    spent = {}
    for trial in range(opts.trials):
        for s in systems:
            if over_budget(opts, spent, s, trial):
                continue
            t_sys = time.monotonic()
            inst = None
            try:
                inst = s.launch(16)
                inst.wait_boots(16, timeout=opts.start_timeout)
                time.sleep(0.3)
                pids = inst.all_pids()
                t0 = time.monotonic()
                os.kill(inst.master, signal.SIGTERM)
                deadline = t0 + opts.stop_cap
                while time.monotonic() < deadline:
                    if inst.popen.poll() is not None and \
                            not any(alive(p) for p in pids):
                        break
                    time.sleep(0.001)
                dt = time.monotonic() - t0
                table.add(key, s.name, dt if dt < opts.stop_cap else INF)
            except Exception as e:
                log('stop: %s: %s' % (s.label, e))
                table.not_applicable(key, s.name, 'failed: %s' % e)
            finally:
                if inst is not None:
                    inst.close(graceful=False)
                spent[s.name] = spent.get(s.name, 0) + \
                    time.monotonic() - t_sys


def bench_master_killed(opts, systems, table):
    key = 'killed'
    table.row(key, 'master SIGKILLed → workers gone (16)', 's',
              '16 idle workers; SIGKILL to the master; time until every '
              'worker is gone (exited or a zombie), polled every 1 ms, '
              'capped at %g s ("never": still running at the cap, then '
              'killed by the harness; such a system gets no further '
              'trials); up to %d trials.' % (opts.kill_cap,
                                              opts.killed_trials))
    floor = 'killed-floor'
    table.row(floor, 'floor: the 16 workers SIGKILLed directly', 's',
              'the floor of the row above: 16 idle workers, the master is '
              'SIGSTOPped (so it respawns nothing), the harness SIGKILLs the '
              '16 workers itself and polls until all are gone: the kernel\'s '
              'teardown time for these processes on this machine at this '
              'moment, in the same rounds (processhandler and Pool only).')
    capped = set()
    spent = {}
    for trial in range(opts.killed_trials):
        for s in systems:
            if isinstance(s, (ProcessHandler, Pool)) and \
                    not over_budget(opts, spent, s, trial):
                try:
                    table.add(floor, s.name, kill_floor(opts, s))
                except Exception as e:
                    log('floor: %s: %s' % (s.label, e))
        for s in systems:
            if s.name in capped or over_budget(opts, spent, s, trial):
                continue
            if opts.quick and isinstance(s, Peer):
                table.not_applicable(key, s.name, 'skipped in --quick (the '
                                     'full run shows they leave their '
                                     'workers running)')
                continue
            t_sys = time.monotonic()
            inst = None
            try:
                inst = s.launch(16)
                inst.wait_boots(16, timeout=opts.start_timeout)
                time.sleep(0.3)
                pids = inst.all_pids() - {inst.master}
                t0 = time.monotonic()
                os.kill(inst.master, signal.SIGKILL)
                deadline = t0 + opts.kill_cap
                while time.monotonic() < deadline:
                    if not any(alive(p) for p in pids):
                        break
                    time.sleep(0.001)
                dt = time.monotonic() - t0
                if dt >= opts.kill_cap:
                    table.add(key, s.name, INF)
                    capped.add(s.name)
                else:
                    table.add(key, s.name, dt)
            except Exception as e:
                log('master killed: %s: %s' % (s.label, e))
                table.not_applicable(key, s.name, 'failed: %s' % e)
            finally:
                if inst is not None:
                    inst.close(graceful=False)
                spent[s.name] = spent.get(s.name, 0) + \
                    time.monotonic() - t_sys
    for s in systems:
        if not isinstance(s, (ProcessHandler, Pool)):
            table.not_applicable(floor, s.name, 'floor measured for '
                                 'processhandler and Pool only')


def kill_floor(opts, s):
    inst = s.launch(16)
    try:
        inst.wait_boots(16, timeout=opts.start_timeout)
        time.sleep(0.3)
        pids = inst.all_pids() - {inst.master}
        os.kill(inst.master, signal.SIGSTOP)
        t0 = time.monotonic()
        TRACK.kill(pids)
        while any(alive(p) for p in pids) and time.monotonic() - t0 < 5:
            time.sleep(0.001)
        return time.monotonic() - t0
    finally:
        try:
            os.kill(inst.master, signal.SIGKILL)
            os.kill(inst.master, signal.SIGCONT)
        except OSError:
            pass
        inst.close(graceful=False)


def count_jobs(inst, seconds):
    """Jobs finished inside a window: sum of 'count' stamps in it / time."""
    t0 = time.monotonic()
    time.sleep(seconds)
    t1 = time.monotonic()
    n = sum(int(e[3].split()[0]) for e in inst.events.of('count')
            if t0 < e[2] <= t1)
    return n / (t1 - t0)


def http_clients(port, seconds, threads=2):
    """Sequential HTTP/1.0 GETs from ``threads`` threads; ok responses."""
    ok = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client():
        n = 0
        while time.monotonic() < stop:
            try:
                c = socket.create_connection(('127.0.0.1', port), timeout=5)
                c.sendall(b'GET / HTTP/1.0\r\nHost: x\r\n\r\n')
                data = b''
                while True:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                c.close()
                if data.startswith(b'HTTP/1.') and b' 200 ' in data[:20]:
                    n += 1
            except OSError:
                time.sleep(0.001)
        with lock:
            ok[0] += n
    ts = [threading.Thread(target=client) for _ in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return ok[0] / (time.monotonic() - t0)


def bench_recycle(opts, systems, table):
    for mr in (1, 100):
        key = 'recycle-%d' % mr
        table.row(key, 'recycle, max_requests=%d (2 workers)' % mr, '/s',
                  '2 workers, a trivial job (return True), each worker '
                  'replaced after %d job(s); jobs finished per second over '
                  '%g s (processhandler: max_requests, run() returns True, '
                  'the jobs are counted by after_run stamps; Pool: '
                  'Pool(2, maxtasksperchild=%d).map(job, range(20), '
                  'chunksize=1) in a loop; gunicorn: max_requests=%d, sync '
                  'workers, 2 client threads doing HTTP/1.0 GETs, so HTTP '
                  'is included; circus / supervisor: a program doing %d '
                  'job(s) then exiting 0, restarted by the manager, counted over '
                  'at least 3 s as they restart slowly); %d '
                  'trial(s).' % (mr, opts.window, mr, mr, mr, opts.trials))
        spent = {}
        for trial in range(opts.trials):
            for s in systems:
                if over_budget(opts, spent, s, trial):
                    continue
                t_sys = time.monotonic()
                inst = None
                try:
                    if isinstance(s, Pool):
                        table.add(key, s.name, run_counter(
                            s, ['pool', 'recycle', str(mr),
                                str(opts.window)]))
                        continue
                    inst = s.launch(2, mode='recycle', max_requests=mr)
                    inst.wait_boots(2, timeout=opts.start_timeout)
                    if isinstance(s, Gunicorn):
                        time.sleep(0.2)
                        table.add(key, s.name,
                                  http_clients(s.port, opts.window))
                    else:
                        table.add(key, s.name, count_jobs(
                            inst, max(opts.window, opts.peer_window)
                            if isinstance(s, Peer) else opts.window))
                except Exception as e:
                    log('recycle %d: %s: %s' % (mr, s.label, e))
                    table.not_applicable(key, s.name, 'failed: %s' % e)
                finally:
                    if inst is not None:
                        inst.close()
                    spent[s.name] = spent.get(s.name, 0) + \
                        time.monotonic() - t_sys


def per_second(extra, cpu):
    """'N WALL [CPU]' -> N per CPU second (when given and asked) or per
    wall second."""
    parts = extra.split()
    n, wall = int(parts[0]), float(parts[1])
    if cpu and len(parts) > 2 and float(parts[2]) > 0:
        return n / float(parts[2])
    return n / wall


def run_counter(system, args, python=None, cpu=False):
    """Run agents.py ARGS EVENTS in the foreground; its 'count' stamp as
    jobs per second."""
    d = system.workdir()
    events = Events(os.path.join(d, 'events.fifo'))
    try:
        p = system.popen([python or system.python, AGENTS] + args +
                         [events.path], d, events.path)
        try:
            p.wait(120)
        finally:
            TRACK.kill_tree([p.pid])
            p.wait(5)
        got = events.of('count')
        if not got:
            raise RuntimeError('no count from %s (see %s)' % (args, d))
        return per_second(got[-1][3], cpu)
    finally:
        events.close()


def bench_loop(opts, systems, table):
    bare, plain, lim = 'loop-bare', 'loop', 'loop-limits'
    table.row(bare, 'loop: bare Python loop (runs/s)', '/s',
              'the same run() method (agents.Spin.run, returns True) called '
              'by ``while w.alive: if run(): n += 1`` in a fresh process of '
              'the same interpreter, stopped by a timer after %g s; runs per '
              'second of the process\'s own CPU time (time.process_time(), '
              'so that other load on the machine does not count).'
              % opts.window)
    table.row(plain, 'loop: runs/s per worker', '/s',
              '1 worker whose run() returns True at once; the worker counts '
              'its runs (self.requests) from the end of init() to after_run()'
              ' (the master gets TERM %g s after the worker booted), per '
              'second of the worker\'s CPU time (time.process_time()).  '
              'Pool: Pool(1).map(job, range(500), chunksize=1) in a loop, '
              'jobs per wall-clock second (per-task IPC between two '
              'processes, not a run loop).' % opts.window)
    table.row('loop-ratio', 'loop: ratio to bare loop', 'x',
              'runs/s per worker / bare loop runs/s of the same interpreter, '
              'paired per trial (bare, plain and limits alternate).')
    table.row('loop-ns', 'loop: overhead per run (ns)', 'ns',
              '1e9 / (runs/s per worker) - 1e9 / (bare loop runs/s): the '
              'time the framework adds to each run, paired per trial.')
    table.row(lim, 'loop: runs/s, timeout + memory limits', '/s',
              'as "runs/s per worker" with timeout = 30, soft_memory_limit ='
              ' 1000, hard_memory_limit = 2000 (MB), check_interval = 1.')
    table.row('loop-limits-ratio', 'loop: ratio with limits', 'x',
              'runs/s with limits / bare loop runs/s, paired per trial.')
    limits = dict(timeout=30, soft_memory_limit=1000,
                  hard_memory_limit=2000, check_interval=1)
    for _ in range(opts.trials):
        for s in systems:
            try:
                if isinstance(s, Pool):
                    b = run_counter(s, ['bare', str(opts.window)], cpu=True)
                    r = run_counter(s, ['pool', 'loop', str(opts.window)])
                    table.add(bare, s.name, b)
                    table.add(plain, s.name, r)
                    table.add('loop-ratio', s.name, r / b)
                    table.add('loop-ns', s.name, 1e9 / r - 1e9 / b)
                    for k in (lim, 'loop-limits-ratio'):
                        table.not_applicable(k, s.name, 'Pool has no '
                                             'per-task timeout or memory '
                                             'limit')
                    continue
                if not isinstance(s, ProcessHandler):
                    for k in (bare, plain, 'loop-ratio', lim,
                              'loop-limits-ratio', 'loop-ns'):
                        table.not_applicable(k, s.name, '%s has no run loop'
                                             ' to call user code in (it runs'
                                             ' programs or serves HTTP)' %
                                             s.label)
                    continue
                b = run_counter(s, ['bare', str(opts.window)], cpu=True)
                r = loop_rate(s, opts.window, {})
                rl = loop_rate(s, opts.window, limits)
                table.add(bare, s.name, b)
                table.add(plain, s.name, r)
                table.add(lim, s.name, rl)
                table.add('loop-ratio', s.name, r / b)
                table.add('loop-limits-ratio', s.name, rl / b)
                table.add('loop-ns', s.name, 1e9 / r - 1e9 / b)
            except Exception as e:
                log('loop: %s: %s' % (s.label, e))
                table.not_applicable(plain, s.name, 'failed: %s' % e)


def loop_rate(s, seconds, extra):
    inst = s.launch(1, mode='loop', **extra)
    try:
        inst.wait_boots(1, timeout=opts_global.start_timeout)
        time.sleep(seconds)
        os.kill(inst.master, signal.SIGTERM)
        got = inst.events.wait(lambda items: [e for e in items
                                              if e[0] == 'count'], 30)
        if not got:
            raise RuntimeError('no count (see %s)' % inst.tmp)
        return per_second(got[0][3], cpu=True)
    finally:
        inst.close()


# -- socket path (issue 4) ------------------------------------------------------

def echo_client_main(argv):
    """--echo-client PORT SECONDS THREADS: print echoed requests."""
    port, seconds, threads = int(argv[0]), float(argv[1]), int(argv[2])
    stop = time.monotonic() + seconds
    counts = []
    msg = b'x' * 64

    def client():
        n = 0
        while time.monotonic() < stop:
            try:
                c = socket.create_connection(('127.0.0.1', port), timeout=5)
                c.sendall(msg)
                got = b''
                while len(got) < len(msg):
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                c.close()
                if got == msg:
                    n += 1
            except OSError:
                time.sleep(0.001)
        counts.append(n)
    ts = [threading.Thread(target=client) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(sum(counts))


def bench_echo(opts, systems, table):
    variants = [('echo-off', 'echo server, accept_lock off', {}),
                ('echo-lock', 'echo server, accept_lock on',
                 {'accept_lock': 'true'}),
                ('echo-reuse', 'echo server, reuse_port',
                 {'reuse_port': 'true'})]
    for key, title, _ in variants:
        table.row(key, title + ' (req/s)', '/s',
                  '2 sync workers with handle(conn, addr) echoing 64 bytes, '
                  'bind = 127.0.0.1:0 (port read from status --json '
                  'master.listeners); 2 client processes x 4 threads, one '
                  'connection per request, for %g s; requests/s echoed; '
                  'variants alternate in each trial.' % opts.echo_window)
    for _ in range(opts.echo_trials):
        for s in systems:
            for key, title, extra in variants:
                if not isinstance(s, ProcessHandler):
                    table.not_applicable(key, s.name, 'processhandler\'s '
                                         'socket path only (issue 4)')
                    continue
                inst = None
                try:
                    keys = dict(extra, bind='127.0.0.1:0')
                    inst = s.launch(2, mode='echo', **keys)
                    inst.wait_boots(2, timeout=opts.start_timeout)
                    doc = s.status(inst)
                    addr = doc['master']['listeners'][0]
                    port = int(addr.rsplit(':', 1)[1])
                    clients = [TRACK.popen(
                        [sys.executable, __file__, '--echo-client',
                         str(port), str(opts.echo_window), '4'],
                        stdout=subprocess.PIPE) for _ in range(2)]
                    total = 0
                    for c in clients:
                        out, _ = c.communicate(timeout=opts.echo_window + 60)
                        total += int(out.strip() or 0)
                    table.add(key, s.name, total / opts.echo_window)
                except Exception as e:
                    log('echo: %s %s: %s' % (s.label, key, e))
                    table.not_applicable(key, s.name, 'failed: %s' % e)
                finally:
                    if inst is not None:
                        inst.close()


# =============================================================================
# Targets (issue 6)
# =============================================================================

def targets(table, systems):
    names = dict((s.name, s) for s in systems)
    cpy = 'ph-cpython' if 'ph-cpython' in names else None
    pypy = 'ph-pypy' if 'ph-pypy' in names else None
    m = table.median
    out = []

    def verdict(what, ok, detail):
        if ok is None:
            out.append('- **not judged**: %s (%s)' % (what, detail))
        else:
            out.append('- **%s**: %s: %s' % ('met' if ok else 'MISSED',
                                              what, detail))

    def f(key, name, unit):
        v = m(key, name)
        return fmt_value(v, unit) if v is not None else 'n/a'

    ph = cpy or pypy
    if ph:
        r, p, g = m('respawn', ph), m('respawn', 'pool'), m('respawn',
                                                            'gunicorn')
        verdict('respawn median ≤ multiprocessing.Pool\'s',
                None if r is None or p is None else r <= p,
                '%s vs Pool %s' % (f('respawn', ph, 's'),
                                   f('respawn', 'pool', 's')))
        verdict('respawn median < half of gunicorn\'s',
                None if r is None or g is None else r < g / 2,
                '%s vs gunicorn %s' % (f('respawn', ph, 's'),
                                       f('respawn', 'gunicorn', 's')))
        w, c = m('idle-wake', ph), m('idle-cpu', ph)
        verdict('idle master: zero wake-ups per second',
                None if w is None else w == 0,
                '%s' % f('idle-wake', ph, '/s'))
        verdict('idle master CPU < 0.05 % of a core (30 ms/min)',
                None if c is None else c < 30,
                '%s' % f('idle-cpu', ph, 'ms/min'))
    if cpy:
        for key, what in (('loop-ratio', 'loop ≥ 90 % of the bare loop'),
                          ('loop-limits-ratio',
                           'loop with timeout + memory limits ≥ 90 % of the '
                           'bare loop')):
            v = m(key, cpy)
            verdict(what + ' (CPython)', None if v is None else v >= 0.9,
                    '%s' % f(key, cpy, 'x'))
        a, b = m('recycle-1', cpy), m('recycle-1', 'pool')
        verdict('recycle at max_requests=1 ≥ Pool(maxtasksperchild=1)',
                None if a is None or b is None else a >= b,
                '%s vs Pool %s' % (f('recycle-1', cpy, '/s'),
                                   f('recycle-1', 'pool', '/s')))
        a, b = m('startup', cpy), m('startup', 'pool')
        verdict('start-up of 64 workers ≤ 1.5 × Pool',
                None if a is None or b is None else a <= 1.5 * b,
                '%s vs Pool %s' % (f('startup', cpy, 's'),
                                   f('startup', 'pool', 's')))
    if ph:
        k = table.samples('killed', ph)
        verdict('master killed: median ≤ 50 ms and every run ≤ 1 s',
                None if not k else (statistics.median(k) <= 0.05 and
                                    max(k) <= 1.0),
                'median %s, max %s over %d runs' % (
                    f('killed', ph, 's'), fmt_value(max(k), 's') if k
                    else 'n/a', len(k)))
    if cpy and pypy:
        for key, what in (('respawn', 'respawn'), ('startup', 'start-up')):
            a, b = m(key, pypy), m(key, cpy)
            verdict('PyPy %s within 2 × CPython' % what,
                    None if a is None or b is None else a <= 2 * b,
                    'PyPy %s vs CPython %s' % (f(key, pypy, 's'),
                                               f(key, cpy, 's')))
    return out


# =============================================================================
# Main
# =============================================================================

def machine():
    cpu = ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    with open('/proc/loadavg') as f:
        load = ' '.join(f.read().split()[:3])
    return dict(nproc=os.cpu_count(), cpu=cpu or platform.processor(),
                kernel='%s %s' % (platform.system(), platform.release()),
                load=load)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true',
                   help='fewer trials and shorter windows (< 2 min)')
    p.add_argument('--smoke', action='store_true',
                   help='the smallest run that exercises every metric')
    p.add_argument('--python', action='append', default=None,
                   help='interpreter(s) for processhandler (repeatable or '
                   'comma separated; default: this one and pypy3 if found)')
    p.add_argument('--systems', default=None,
                   help='comma separated from processhandler, pool, '
                   'gunicorn, circus, supervisor (default: all)')
    p.add_argument('--metrics', default=None,
                   help='comma separated from respawn, idle, startup, loop, '
                   'recycle, stop, killed, scale, echo (default: all)')
    p.add_argument('--no-results', action='store_true',
                   help='print the table only, do not write RESULTS.md')
    p.add_argument('--svg-only', action='store_true',
                   help='only redraw bench/results.svg from the table in '
                   'RESULTS.md (no benchmark run)')
    p.add_argument('--svg-from', default=RESULTS, help=argparse.SUPPRESS)
    p.add_argument('--svg-to', default=CHART, help=argparse.SUPPRESS)
    p.add_argument('--echo-client', nargs=3, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings(opts):
    if opts.smoke:
        opts.quick = True
        opts.kills, opts.trials, opts.window = 3, 1, 0.5
        opts.idle_window, opts.idle_parts = 1.0, 1
        opts.scale_n = 32
    elif opts.quick:
        opts.kills, opts.trials, opts.window = 10, 1, 1.0
        opts.idle_window, opts.idle_parts = 4.0, 4
        opts.scale_n = 256
    else:
        opts.kills, opts.trials, opts.window = 30, 4, 1.5
        opts.idle_window, opts.idle_parts = 20.0, 10
        opts.scale_n = 256
    opts.startup_trials = opts.trials
    # Peers restart slowly (seconds): a longer window to count anything.
    opts.peer_window = 2.0 if opts.quick else 3.0
    opts.killed_trials = 1 if opts.quick else opts.trials * 2
    opts.echo_window = 0.5 if opts.quick else opts.window
    # Not a target of issue 6 (the socket path's own figures): fewer rounds
    # keep the full run under 10 minutes.
    opts.echo_trials = min(opts.trials, 2)
    opts.startup_n = 16 if opts.smoke else 64
    opts.respawn_timeout = 5.0
    opts.respawn_budget = 45.0 if not opts.quick else 8.0
    opts.system_budget = 25.0 if not opts.quick else 4.0
    opts.start_timeout = 120.0
    opts.stop_cap = 15.0
    opts.kill_cap = 3.0 if not opts.quick else 1.5
    if opts.quick:
        opts.trials = max(opts.trials, 1)


def build_systems(opts):
    wanted = (opts.systems or 'processhandler,pool,gunicorn,circus,'
              'supervisor').replace(' ', '').split(',')
    pythons = []
    for item in opts.python or []:
        pythons += [x for x in item.split(',') if x]
    if not pythons:
        pythons = [sys.executable]
        if shutil.which('pypy3') and not opts.smoke:
            pythons.append(shutil.which('pypy3'))
    systems = []
    for w in wanted:
        if w in ('processhandler', 'ph'):
            for py in pythons:
                systems.append(ProcessHandler(opts, py))
        elif w == 'pypy':
            systems.append(ProcessHandler(opts, 'pypy3'))
        elif w == 'pool':
            systems.append(Pool(opts))
        elif w == 'gunicorn':
            systems.append(Gunicorn(opts))
        elif w == 'circus':
            systems.append(Circus(opts))
        elif w == 'supervisor':
            systems.append(Supervisor(opts))
        else:
            raise SystemExit('unknown system %r' % w)
    return systems


opts_global = None


def main(argv=None):
    global opts_global
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.echo_client:
        return echo_client_main(opts.echo_client)
    if opts.svg_only:
        return write_chart(opts.svg_from, opts.svg_to)
    settings(opts)
    opts_global = opts
    become_subreaper()
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    opts.tmp = tempfile.mkdtemp(prefix='ph-bench-')
    systems = build_systems(opts)
    present = [s for s in systems if s.available]
    metrics = (opts.metrics or 'respawn,idle,startup,loop,recycle,stop,'
               'killed,scale,echo').split(',')
    info = machine()
    log('systems: %s' % ', '.join(s.label + ('' if s.available else
                                             ' (missing)') for s in systems))
    table = Table()
    t0 = time.monotonic()
    try:
        steps = [
            ('respawn', lambda: bench_respawn(opts, present, table)),
            ('idle', lambda: bench_idle(opts, present, table)),
            ('startup', lambda: bench_startup(
                opts, present, table, opts.startup_n, 'startup',
                'start-up (%d workers)' % opts.startup_n,
                opts.startup_trials)),
            ('loop', lambda: bench_loop(opts, present, table)),
            ('recycle', lambda: bench_recycle(opts, present, table)),
            ('stop', lambda: bench_stop(opts, present, table)),
            ('killed', lambda: bench_master_killed(opts, present, table)),
            ('scale', lambda: bench_startup(
                opts, present, table, opts.scale_n, 'scale',
                'scale: start-up (%d workers)' % opts.scale_n, 1,
                scale=True)),
            ('echo', lambda: bench_echo(opts, present, table)),
        ]
        for name, fn in steps:
            if name in metrics:
                log('== %s' % name)
                fn()
    finally:
        TRACK.cleanup()
        shutil.rmtree(opts.tmp, ignore_errors=True)
    elapsed = time.monotonic() - t0
    info['load_end'] = open('/proc/loadavg').read().split()[:3]
    text, notes = render(table, systems)
    print(text)
    for i, (system, why) in enumerate(notes, 1):
        print('[%d] %s: %s' % (i, system, why))
    verdicts = targets(table, systems)
    print('\n'.join(verdicts))
    if not opts.no_results and not opts.smoke:
        write_results(opts, argv, info, systems, table, text, notes,
                      verdicts, elapsed)
    return 0


ANALYSIS_MARK = '## Analysis'


def write_results(opts, argv, info, systems, table, text, notes, verdicts,
                  elapsed):
    kept = ''
    try:
        with open(RESULTS) as f:
            old = f.read()
        if ANALYSIS_MARK in old:
            kept = old[old.index(ANALYSIS_MARK):]
    except OSError:
        pass
    pythons = []
    for s in systems:
        v = getattr(s, 'version', '')
        pythons.append('  - %s: %s%s' % (
            s.label, v or interpreter_version(s.python),
            '' if s.available else ' (not installed)'))
    lines = [
        '# Benchmark results',
        '',
        'Generated by `bench/run.py` (see bench/README.md).  Medians, with '
        'the range (min–max) of the trials in brackets.',
        '',
        '- date: %s' % datetime.datetime.now().strftime('%Y-%m-%d %H:%M'),
        '- command: `python3 bench/run.py%s`' % (
            ' ' + ' '.join(argv) if argv else ''),
        '- machine: %d CPU(s), %s, %s' % (info['nproc'], info['cpu'],
                                          info['kernel']),
        '- load average (1/5/15 min) at start: %s; at the end: %s%s' % (
            info['load'], ' '.join(info['load_end']),
            ' (the machine was busy with other work: expect noise)'
            if float(info['load'].split()[0]) > 1.0 else ''),
        '- wall time of the run: %.0f s' % elapsed,
        '- interpreters and versions:',
    ] + pythons + [
        '  - harness: %s %s' % (platform.python_implementation(),
                              platform.python_version()),
        '',
        '## Table',
        '',
        text,
        '',
    ]
    if notes:
        lines += ['Not measured:', '']
        lines += ['%d. %s: %s' % (i, s_, w) for i, (s_, w)
                  in enumerate(notes, 1)]
        lines.append('')
    lines += ['## Targets of issue 6', ''] + verdicts + ['', '## Method', '']
    for key, title, unit in table.rows:
        lines.append('- **%s**: %s' % (title, table.methods[key]))
    lines.append('')
    lines.append('Every timestamp is CLOCK_MONOTONIC (Python\'s '
                 'time.monotonic(), system-wide on Linux), written by the '
                 'user code into a FIFO the harness reads.  Systems run '
                 'side by side in one run, trials round-robin, so their '
                 'ratios hold on a noisy machine even when absolute numbers '
                 'move.')
    lines.append('')
    if kept:
        lines.append(kept.rstrip() + '\n')
    with open(RESULTS, 'w') as f:
        f.write('\n'.join(lines))
    log('wrote %s' % RESULTS)
    write_chart(RESULTS, CHART)



# =============================================================================
# The chart: bench/results.svg, drawn from the table in RESULTS.md
# =============================================================================
# The table in RESULTS.md is the one source: the chart is redrawn from it
# (`--svg-only`) without a new run, and cannot disagree with it.  The SVG
# text is written by hand (standard library only).

# (row title in RESULTS.md, caption, True when lower is better)
HEADLINES = [
    ('respawn latency', 'respawn latency (worker killed -> replacement '
     'runs user code)', True),
    ('start-up (64 workers)', 'start-up, 64 workers', True),
    ('stop (TERM, 16 workers)', 'stop (TERM), 16 workers', True),
    ('master SIGKILLed → workers gone (16)', 'master SIGKILLed -> its 16 '
     'workers gone', True),
    ('recycle, max_requests=1 (2 workers)', 'recycle rate, max_requests=1',
     False),
    ('recycle, max_requests=100 (2 workers)',
     'recycle rate, max_requests=100', False),
    ('idle master wake-ups (16 workers)', 'idle master wake-ups, 16 '
     'workers', True),
    ('idle master CPU (16 workers)', 'idle master CPU, 16 workers', True),
]
COLOURS = ['#1f6feb', '#58a6ff', '#8b949e', '#d29922', '#2da44e',
           '#a371f7', '#3fb950']
# Longest first: ' ms/min' before ' ms', ' M/s' before '/s'.
UNITS = [(' ms/min', 1.0), (' G/s', 1e9), (' M/s', 1e6), (' k/s', 1e3),
         ('/s', 1.0), (' µs', 1e-6), (' ms', 1e-3), (' ns', 1e-9),
         (' MB', 1.0), (' s', 1.0)]


def read_table(path):
    """RESULTS.md -> (column labels, {row title: [cell, ...]})."""
    with open(path, encoding='utf-8') as f:
        lines = [l for l in f.read().splitlines() if l.startswith('| ')]
    cells = [[c.strip() for c in l.strip().strip('|').split(' | ')]
             for l in lines]
    header, rows = cells[0], cells[1:]
    return header[1:], dict((r[0], r[1:]) for r in rows)


def cell_value(cell):
    """'3.31 ms (2.74 ms–4.5 ms)' -> (0.00331, '3.31 ms'); 'never' ->
    (inf, 'never'); 'n/a [1]' or '' -> (None, 'n/a')."""
    shown = cell.split(' (')[0].strip()
    if shown == 'never':
        return INF, shown
    for suffix, scale in UNITS:
        if shown.endswith(suffix):
            try:
                return float(shown[:-len(suffix)]) * scale, shown
            except ValueError:
                break
    try:
        return float(shown), shown
    except ValueError:
        return None, 'n/a'


def xml_text(s):
    return (s.replace('&', '&amp;').replace('<', '&lt;')
            .replace('>', '&gt;'))


def chart_panel(x, y, w, caption, lower, labels, values):
    """SVG elements of one metric: a bar per system, the value beside it."""
    out = ['<text x="%d" y="%d" class="cap">%s <tspan class="dir">(%s)'
           '</tspan></text>' % (x, y + 14, xml_text(caption),
                                'lower is better' if lower
                                else 'higher is better')]
    finite = [v for v, _ in values if v is not None and v != INF]
    top = max(finite) if finite and max(finite) > 0 else 1.0
    left, bar_w = x + 190, w - 190 - 80
    for i, (label, (v, shown)) in enumerate(zip(labels, values)):
        by = y + 24 + i * 18
        out.append('<text x="%d" y="%d" class="lab">%s</text>' % (
            left - 6, by + 11, xml_text(label)))
        if v is None:
            n, cls = 0, 'na'
        elif v == INF:
            n, cls = bar_w, 'never'
        else:
            n, cls = max(1.5, bar_w * v / top), 'c%d' % i
        if n:
            out.append('<rect x="%d" y="%d" width="%.1f" height="13" '
                       'class="%s"/>' % (left, by, n, cls))
        out.append('<text x="%.1f" y="%d" class="val">%s</text>' % (
            left + n + 4, by + 11, xml_text(shown)))
    return out, 24 + len(labels) * 18 + 14


def render_chart(labels, rows, source):
    width, col_w, pad = 1100, 540, 10
    parts, heights, y = [], [], 44
    panels = [(t, c, lo) for t, c, lo in HEADLINES if t in rows]
    for i, (title, caption, lower) in enumerate(panels):
        x = pad + (i % 2) * (col_w + pad)
        if i % 2 == 0 and i:
            y += max(heights[-2:])
        values = [cell_value(c) for c in rows[title]]
        els, h = chart_panel(x, y, col_w, caption, lower, labels, values)
        parts += els
        heights.append(h)
    height = y + (max(heights[-2:]) if heights else 0) + 24
    style = ['text{font-family:DejaVu Sans,Arial,sans-serif;font-size:11px;'
             'fill:#24292f}', '.cap{font-weight:bold;font-size:12px}',
             '.dir{font-weight:normal;fill:#57606a}',
             '.lab{text-anchor:end}', '.val{fill:#24292f}',
             '.title{font-size:15px;font-weight:bold}',
             '.note{fill:#57606a;font-size:10px}',
             '.never{fill:url(#hatch)}', '.na{fill:none}']
    style += ['.c%d{fill:%s}' % (i, COLOURS[i % len(COLOURS)])
              for i in range(len(labels))]
    head = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
        'viewBox="0 0 %d %d">' % (width, height, width, height),
        '<defs><pattern id="hatch" width="6" height="6" '
        'patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        '<rect width="6" height="6" fill="#ffebe9"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#cf222e" '
        'stroke-width="2"/></pattern></defs>',
        '<style>%s</style>' % ''.join(style),
        '<rect width="100%" height="100%" fill="white"/>',
        '<text x="%d" y="24" class="title">processhandler and its peers: '
        'headline metrics (medians)</text>' % pad]
    foot = ['<text x="%d" y="%d" class="note">Drawn by bench/run.py from '
            'the table in %s; linear scale per panel; hatched: never '
            'happened; n/a: not applicable (see RESULTS.md).</text>'
            % (pad, height - 8, xml_text(source)), '</svg>']
    return '\n'.join(head + parts + foot) + '\n'


def write_chart(source, target):
    """Redraw the chart from the table in ``source`` (RESULTS.md)."""
    try:
        labels, rows = read_table(source)
    except (OSError, IndexError) as e:
        sys.stderr.write('bench/run.py: no table to draw in %s: %s\n'
                         % (source, e))
        return 1
    text = render_chart(labels, rows, os.path.relpath(source, ROOT))
    tmp = target + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.rename(tmp, target)
    log('wrote %s' % target)
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        TRACK.cleanup()
        sys.stderr.write('interrupted; every process started was killed\n')
        sys.exit(130)
