"""Concurrency and servers: worker types, socket serving with handle(),
accept lock, SO_REUSEPORT, privilege drop after bind, CPU affinity, USR2
zero-downtime upgrade, systemd notify / socket activation, msgpack-RPC.

Everything runs real processes and real sockets on 127.0.0.1 (``bind =
127.0.0.1:0``; the bound port is read from ``status --json``
master.listeners, never scanned for).
"""
import collections
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

import processhandler
from test_processhandler import (DEADLINE, PH, PY, Project, alive, proc_state,
                                 proj, wait_for)

assert proj   # the fixture, imported for the tests below

try:
    import gevent   # noqa: F401  (only asks whether it is importable)
    HAVE_GEVENT = True
except ImportError:
    HAVE_GEVENT = False

try:
    import msgpack   # noqa: F401
    HAVE_MSGPACK = True
except ImportError:
    HAVE_MSGPACK = False

NEEDS_GEVENT = pytest.mark.skipif(
    not HAVE_GEVENT, reason='gevent is not importable in %s (%s): the '
    'greenlet worker type cannot run here' % (
        sys.executable, sys.implementation.name))


def _have_ipv6():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            s.bind(('::1', 0))
        finally:
            s.close()
        return True
    except OSError:
        return False


HAVE_IPV6 = _have_ipv6()

WORKER_TYPE_PARAMS = ['sync', 'thread', 'asyncio',
                      pytest.param('gevent', marks=NEEDS_GEVENT)]
CONCURRENT_TYPES = ['thread', 'asyncio',
                    pytest.param('gevent', marks=NEEDS_GEVENT)]


# -- worker code ------------------------------------------------------------------

# Run-loop workers for every worker_type.  Every event is one O_APPEND write
# of one line to events.log, in the format Project.events() reads.
TYPED_WORKER = '''
import asyncio, os, time
import processhandler

def event(worker, name, extra=''):
    line = '%s %s %d %.6f %s\\n' % (name, worker.slot, os.getpid(),
                                    time.monotonic(), extra)
    fd = os.open(os.path.join(worker.cfg.base_path, 'events.log'),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)

class Job(processhandler.Worker):
    def run(self):
        event(self, 'run_start')
        time.sleep(float(self.cfg.get('run_time', '0.05')))
        event(self, 'run_end')
        return True

    def after_run(self):
        event(self, 'after_run', str(self.requests))

class AsyncJob(processhandler.Worker):
    async def run(self):
        event(self, 'run_start')
        await asyncio.sleep(float(self.cfg.get('run_time', '0.05')))
        event(self, 'run_end')
        return True

    def after_run(self):
        event(self, 'after_run', str(self.requests))
'''

# Echo servers: on accept the handler greets with its pid (so a client
# knows which worker holds its connection, and that a handler is now busy
# with it), then echoes one line back.
ECHO_WORKER = '''
import os
import processhandler

class Echo(processhandler.Worker):
    def handle(self, conn, addr):
        conn.sendall(b'%d\\n' % os.getpid())
        data = b''
        while not data.endswith(b'\\n'):
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        conn.sendall(data)

class AsyncEcho(processhandler.Worker):
    async def handle(self, reader, writer):
        writer.write(b'%d\\n' % os.getpid())
        await writer.drain()
        line = await reader.readline()
        writer.write(line)
        await writer.drain()
'''


def typed_config(proj, wtype, **keys):
    proj.write_module('typed', TYPED_WORKER)
    values = dict(worker_class='typed:AsyncJob' if wtype == 'asyncio'
                  else 'typed:Job', worker_type=wtype)
    values.update(keys)
    return proj.write_config(**values)


def echo_config(proj, wtype, bind='127.0.0.1:0', **keys):
    proj.write_module('echo', ECHO_WORKER)
    values = dict(worker_class='echo:AsyncEcho' if wtype == 'asyncio'
                  else 'echo:Echo', worker_type=wtype, bind=bind)
    values.update(keys)
    return proj.write_config(**values)


# -- helpers ------------------------------------------------------------------------

def max_overlap(events, pid):
    """The most runs of ``pid`` in progress at one moment."""
    marks = sorted((e[3], 0 if e[0] == 'run_end' else 1)
                   for e in events if e[2] == pid and
                   e[0] in ('run_start', 'run_end'))
    best = cur = 0
    for _, kind in marks:
        cur += 1 if kind else -1
        best = max(best, cur)
    return best


def per_pid(events, kind):
    return collections.Counter(e[2] for e in events if e[0] == kind)


def target(name):
    """A listener name from status ('h:p', '[v6]:p', 'unix:/p') ->
    (family, address) to connect to."""
    if name.startswith('unix:'):
        return socket.AF_UNIX, name[5:]
    if name.startswith('['):
        host, _, port = name[1:].partition(']:')
        return socket.AF_INET6, (host, int(port))
    host, _, port = name.rpartition(':')
    return socket.AF_INET, (host, int(port))


def connect(name, timeout=DEADLINE):
    family, address = target(name)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(address)
    except BaseException:
        s.close()
        raise
    return s


def read_line(s):
    data = b''
    while not data.endswith(b'\n'):
        chunk = s.recv(4096)
        if not chunk:
            raise EOFError('connection closed after %r' % data)
        data += chunk
    return data


def echo_once(name, msg, timeout=DEADLINE):
    """One connection: greeting (worker pid), then echo of ``msg``.
    Returns the serving worker's pid."""
    s = connect(name, timeout)
    try:
        pid = int(read_line(s))
        s.sendall(msg + b'\n')
        back = read_line(s)
        assert back == msg + b'\n', (back, msg)
        return pid
    finally:
        s.close()


def wait_log(proj, needle, timeout=DEADLINE):
    """Wait until the master log contains ``needle``; on failure show the
    log (tmp folders of failed runs do not survive concurrent runs)."""
    try:
        wait_for(lambda: needle in proj.log_text(), timeout, repr(needle))
    except AssertionError as e:
        raise AssertionError('%s\n--- log ---\n%s' % (e, proj.log_text()))


def listeners(proj):
    doc = wait_for(proj.status, what='status')
    return doc['master']['listeners']


def hammer(name, n_threads, per_thread):
    """``n_threads`` clients doing ``per_thread`` echo round trips each;
    returns (pids that answered, errors)."""
    pids, errors = collections.Counter(), []
    lock = threading.Lock()

    def client(k):
        for i in range(per_thread):
            msg = ('client %d msg %d' % (k, i)).encode()
            try:
                pid = echo_once(name, msg)
            except Exception as e:
                with lock:
                    errors.append(repr(e))
            else:
                with lock:
                    pids[pid] += 1

    threads = [threading.Thread(target=client, args=(k,))
               for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE * 3)
    assert not any(t.is_alive() for t in threads), 'clients hung'
    return pids, errors


def hold_connections(name, count):
    """Open ``count`` connections one by one, reading each greeting before
    opening the next: each open connection now occupies one handler.
    Returns [(sock, pid)]."""
    held = []
    try:
        for _ in range(count):
            s = connect(name)
            held.append((s, int(read_line(s))))
    except BaseException:
        for s, _ in held:
            s.close()
        raise
    return held


def finish_held(held):
    for i, (s, _) in enumerate(held):
        msg = b'held %d\n' % i
        s.sendall(msg)
        assert read_line(s) == msg
        s.close()


def cpus_allowed(pid, task=None):
    path = '/proc/%d/status' % pid if task is None else \
        '/proc/%d/task/%d/status' % (pid, task)
    with open(path) as f:
        for line in f:
            if line.startswith('Cpus_allowed_list:'):
                return expand_cpu_list(line.split(':', 1)[1].strip())
    raise AssertionError('no Cpus_allowed_list for %d' % pid)


def expand_cpu_list(text):
    """The kernel's list format ('0-2,5'), parsed here independently of
    processhandler.parse_cpu_list."""
    out = []
    for part in text.split(','):
        lo, _, hi = part.partition('-')
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def uid_of(pid):
    with open('/proc/%d/status' % pid) as f:
        return int([l for l in f if l.startswith('Uid:')][0].split()[1])


def socket_inodes(pid):
    """Inodes of the sockets ``pid`` has open (from /proc/PID/fd)."""
    out = set()
    for fd in os.listdir('/proc/%d/fd' % pid):
        try:
            link = os.readlink('/proc/%d/fd/%s' % (pid, fd))
        except OSError:
            continue
        if link.startswith('socket:['):
            out.add(int(link[8:-1]))
    return out


def tcp_listen_inodes(port):
    """Inodes of the sockets in LISTEN state on ``port`` (/proc/net/tcp)."""
    out = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[1].rsplit(':', 1)[1], 16) == port and \
                    cols[3] == '0A':
                out.add(int(cols[9]))
    return out


def fd_targets(pid):
    out = set()
    for fd in os.listdir('/proc/%d/fd' % pid):
        try:
            out.add(os.readlink('/proc/%d/fd/%s' % (pid, fd)))
        except OSError:
            pass
    return out


class NotifySocket(object):
    """A fake systemd NOTIFY_SOCKET: collects datagrams with arrival time."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.messages = []     # (monotonic, {key: value}, raw)

    def poll(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return self.messages
            fields = dict(line.partition('=')[::2]
                          for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields, data.decode()))

    def wait(self, predicate, what, timeout=DEADLINE):
        """Wait for a message matching ``predicate`` (after those already
        seen by earlier waits); return its index."""
        start = getattr(self, 'seen', 0)

        def found():
            msgs = self.poll()
            for i in range(start, len(msgs)):
                if predicate(msgs[i][1]):
                    return i + 1
            return None
        i = wait_for(found, timeout, what) - 1
        self.seen = i + 1
        return i

    def close(self):
        self.sock.close()


# -- 1. worker types ---------------------------------------------------------------

@pytest.mark.parametrize('wtype', CONCURRENT_TYPES)
def test_concurrent_types_overlap_runs_in_one_process(proj, wtype):
    """thread/asyncio/gevent with threads=4: four run() calls are in
    progress at the same moment inside one worker process (and never
    more)."""
    typed_config(proj, wtype, number_workers=1, threads=4, run_time=0.4)
    proj.start_daemon()
    workers = proj.wait_running(1)
    pid = workers[1]
    wait_for(lambda: per_pid(proj.events(), 'run_end')[pid] >= 12,
             what='12 runs finished')
    events = proj.events()
    assert {e[2] for e in events} == {pid}
    assert max_overlap(events, pid) == 4, events


def test_sync_type_never_overlaps_runs(proj):
    """worker_type = sync runs one run() at a time per process, even with
    threads set."""
    typed_config(proj, 'sync', number_workers=1, threads=4, run_time=0.05)
    proj.start_daemon()
    pid = proj.wait_running(1)[1]
    wait_for(lambda: per_pid(proj.events(), 'run_end')[pid] >= 10)
    assert max_overlap(proj.events(), pid) == 1


@pytest.mark.parametrize('wtype', WORKER_TYPE_PARAMS)
def test_max_requests_recycles_in_every_type(proj, wtype):
    """max_requests = 3: each worker process handles exactly 3 runs (never
    more, even with 4 concurrent runs), exits gracefully (after_run), and
    is replaced in the same slot by a new pid."""
    typed_config(proj, wtype, number_workers=1, threads=4, run_time=0.05,
                 max_requests=3)
    proj.start_daemon()

    def recycled():
        done = per_pid(proj.events(), 'after_run')
        return len(done) >= 3 and done
    done = wait_for(recycled, what='3 recycled workers')
    events = proj.events()
    ends = per_pid(events, 'run_end')
    assert {e[1] for e in events} == {1}           # always slot 1
    for pid in done:
        assert ends[pid] == 3, (pid, ends)
    assert all(n <= 3 for n in ends.values()), ends
    assert 'max_requests reached' in proj.log_text()


@pytest.mark.parametrize('wtype', WORKER_TYPE_PARAMS)
def test_graceful_term_lets_runs_in_flight_finish(proj, wtype):
    """TERM to a foreground master while runs are in flight (4 at once in
    the concurrent types): every run_start gets its run_end, after_run is
    called, the master exits 0."""
    typed_config(proj, wtype, number_workers=1, threads=4, run_time=1.0)
    p = proj.start_foreground()
    want = 1 if wtype == 'sync' else 4
    wait_for(lambda: len(proj.events('run_start')) >= want,
             what='%d runs started' % want)
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(DEADLINE) == 0, proj.fg_output()
    events = proj.events()
    starts, ends = per_pid(events, 'run_start'), per_pid(events, 'run_end')
    assert starts == ends, (starts, ends)
    assert sum(ends.values()) >= want
    assert per_pid(events, 'after_run')


@pytest.mark.parametrize('wtype', CONCURRENT_TYPES)
def test_timeout_kills_hung_run_in_concurrent_types(proj, wtype):
    """timeout = 1 with a run() that hangs (60 s) in a thread/asyncio/gevent
    worker: the master logs the timeout with the stack dump record, kills
    the worker and a replacement in slot 1 starts running."""
    typed_config(proj, wtype, number_workers=1, threads=2, run_time=60,
                 timeout=1)
    proj.start_daemon()
    # The first worker's pid from its own event: under load a status call
    # may come only after it has already been timed out and replaced.
    first = wait_for(lambda: proj.events('run_start'))[0][2]

    def replaced():
        pids = {e[2] for e in proj.events('run_start') if e[1] == 1}
        return len(pids) >= 2 and pids
    wait_for(replaced, what='a replacement worker running')
    log = proj.log_text()
    assert 'worker 1 (pid %d) timed out' % first in log, log
    assert 'worker 1 (pid %d) killed after timeout' % first in log, log
    wait_for(lambda: proc_state(first) is None, what='hung worker reaped')
    assert not proj.events('run_end')


# -- 2. socket servers ---------------------------------------------------------------

@pytest.mark.parametrize('wtype', WORKER_TYPE_PARAMS)
def test_echo_server_tcp4_every_type(proj, wtype):
    """bind = 127.0.0.1:0 with a handle() worker: 200 connections from 8
    concurrent clients are all answered, by the workers only, and both
    worker pids serve."""
    echo_config(proj, wtype, threads=4)
    proj.start_daemon()
    workers = proj.wait_running(2)
    [name] = listeners(proj)
    assert name.startswith('127.0.0.1:') and not name.endswith(':0')
    pids, errors = hammer(name, 8, 25)
    assert not errors, errors[:5]
    assert sum(pids.values()) == 200
    assert set(pids) <= set(workers.values()), (pids, workers)
    seen = set(pids)

    def both_served():
        seen.update(hammer(name, 4, 5)[0])
        return seen == set(workers.values())
    wait_for(both_served, what='both workers serving')


@pytest.mark.parametrize('wtype, threads', [
    ('sync', 1), ('thread', 3),
    pytest.param('gevent', 3, marks=NEEDS_GEVENT)])
def test_each_handler_serves_one_connection_at_a_time(proj, wtype, threads):
    """2 workers x ``threads`` handlers: 2*threads connections held open at
    once are spread exactly ``threads`` per worker pid (accepting is
    concurrent per worker_type and a busy handler does not accept)."""
    echo_config(proj, wtype, threads=threads)
    proj.start_daemon()
    workers = proj.wait_running(2)
    [name] = listeners(proj)
    held = hold_connections(name, 2 * threads)
    try:
        counts = collections.Counter(pid for _, pid in held)
        assert counts == dict((pid, threads) for pid in workers.values())
    finally:
        finish_held(held)


@pytest.mark.skipif(not HAVE_IPV6, reason='no IPv6 loopback here')
@pytest.mark.parametrize('wtype', ['sync', 'asyncio'])
def test_echo_server_ipv6(proj, wtype):
    """bind = [::1]:0: the listener is IPv6 and answers every client."""
    echo_config(proj, wtype, bind='[::1]:0', threads=2)
    proj.start_daemon()
    workers = proj.wait_running(2)
    [name] = listeners(proj)
    assert name.startswith('[::1]:') and not name.endswith(':0')
    pids, errors = hammer(name, 4, 20)
    assert not errors, errors[:5]
    assert sum(pids.values()) == 80
    assert set(pids) <= set(workers.values())


@pytest.mark.parametrize('wtype', ['thread', 'asyncio'])
def test_echo_server_unix_socket_mode_and_removal(proj, wtype):
    """bind = unix:/path: the socket file has mode 0660, serves every
    client, and is removed when the master stops."""
    path = os.path.join(proj.path, 'echo.sock')
    echo_config(proj, wtype, bind='unix:' + path, threads=2)
    proj.start_daemon()
    workers = proj.wait_running(2)
    assert listeners(proj) == ['unix:' + path]
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    pids, errors = hammer('unix:' + path, 4, 20)
    assert not errors, errors[:5]
    assert sum(pids.values()) == 80
    assert set(pids) <= set(workers.values())
    res = proj.ph('stop')
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(path)


def test_unix_socket_stale_file_replaced_and_live_one_refused(proj):
    """A stale unix socket file (nobody listening) is replaced; a path
    where a live server listens makes a second master fail with exit 1 and
    one 'cannot bind' line."""
    path = os.path.join(proj.path, 'echo.sock')
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()                       # the file stays, nobody listens
    echo_config(proj, 'sync', bind='unix:' + path)
    proj.start_daemon()
    proj.wait_running(2)
    assert echo_once('unix:' + path, b'after stale')
    os.mkdir(os.path.join(proj.path, 'second'))
    other = Project(os.path.join(proj.path, 'second'))
    try:
        echo_config(other, 'sync', bind='unix:' + path)
        res = other.ph('start', '-f', timeout=DEADLINE * 2)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1, (res.returncode, res.stderr)
        assert len(lines) == 1 and 'cannot bind' in lines[0], res.stderr
        assert 'Traceback' not in res.stderr
    finally:
        assert not other.cleanup()
    assert echo_once('unix:' + path, b'first still serves')


@pytest.mark.parametrize('wtype', ['sync', 'thread',
                                   pytest.param('gevent',
                                                marks=NEEDS_GEVENT)])
def test_accept_lock_serves_everyone(proj, wtype):
    """accept_lock = true: every worker holds the master's (unlinked) lock
    file, and all clients are answered by both workers."""
    echo_config(proj, wtype, threads=2, accept_lock='true')
    proj.start_daemon()
    workers = proj.wait_running(2)
    [name] = listeners(proj)
    locks = [set(t for t in fd_targets(pid)
                 if 'processhandler-accept-' in t)
             for pid in workers.values()]
    assert len(locks[0]) == 1 and locks[0] == locks[1], locks
    pids, errors = hammer(name, 6, 25)
    assert not errors, errors[:5]
    assert sum(pids.values()) == 150
    assert set(pids) <= set(workers.values())
    seen = set(pids)

    def both_served():
        seen.update(hammer(name, 4, 5)[0])
        return seen == set(workers.values())
    wait_for(both_served, what='both workers serving')


@pytest.mark.parametrize('wtype', ['sync', 'asyncio'])
def test_reuse_port_gives_each_worker_its_own_listener(proj, wtype):
    """reuse_port = true: each worker has its own LISTEN socket on the
    port (distinct inodes in /proc/PID/fd, found in /proc/net/tcp), the
    master only holds a bound, non-listening placeholder; both workers
    answer."""
    echo_config(proj, wtype, threads=2, reuse_port='true')
    master = proj.start_daemon()
    workers = proj.wait_running(2)
    [name] = listeners(proj)
    port = target(name)[1][1]
    listening = tcp_listen_inodes(port)
    own = [socket_inodes(pid) & listening for pid in workers.values()]
    assert all(len(o) == 1 for o in own), (own, listening)
    assert own[0] != own[1]
    assert not socket_inodes(master) & listening
    pids, errors = hammer(name, 6, 20)
    assert not errors, errors[:5]
    seen = set(pids)

    def both_served():
        seen.update(hammer(name, 4, 5)[0])
        return seen == set(workers.values())
    wait_for(both_served, what='both workers serving')


def test_second_master_on_same_port_fails_with_one_line(proj, tmp_path):
    """A second master (another project) binding the port the first one
    holds exits 1 with one 'cannot bind' line and no traceback; the first
    keeps serving."""
    echo_config(proj, 'sync')
    proj.start_daemon()
    proj.wait_running(2)
    [name] = listeners(proj)
    os.mkdir(str(tmp_path / 'other'))
    other = Project(tmp_path / 'other')
    try:
        echo_config(other, 'sync', bind=name)
        res = other.ph('start', '-f', timeout=DEADLINE * 2)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1, (res.returncode, res.stderr)
        assert len(lines) == 1, res.stderr
        assert 'cannot bind %s' % name in lines[0], lines
        assert 'Traceback' not in res.stderr
        res = other.ph('start', '-d', timeout=DEADLINE * 2)
        assert res.returncode == 1, (res.stdout, res.stderr)
        assert 'cannot bind' in res.stdout + res.stderr
        assert not os.path.exists(other.pidfile)
    finally:
        assert not other.cleanup()
    assert echo_once(name, b'still here')


# -- 3. privileges dropped after bind ------------------------------------------------

@pytest.mark.skipif(os.getuid() != 0, reason='needs root')
@pytest.mark.parametrize('wtype', ['sync', 'thread'])
def test_user_drop_happens_after_bind(proj, wtype):
    """As root with user = nobody and a unix socket in a directory only
    root may write: the master (root) binds it, then the workers run as
    nobody and serve connections on it.  The socket file is given to
    nobody."""
    nobody = pwd.getpwnam('nobody')
    os.chmod(proj.path, 0o755)
    private = os.path.join(proj.path, 'private')
    os.mkdir(private, 0o700)
    path = os.path.join(private, 'echo.sock')
    echo_config(proj, wtype, bind='unix:' + path, user='nobody', threads=2)
    master = proj.start_daemon()
    workers = proj.wait_running(2)
    assert uid_of(master) == 0
    assert all(uid_of(p) == nobody.pw_uid for p in workers.values())
    # nobody could not have created it: the master bound before the drop.
    probe = subprocess.run(
        [PY, '-c', 'import os; os.setgid(%d); os.setuid(%d); '
         'open(%r, "w")' % (nobody.pw_gid, nobody.pw_uid,
                           os.path.join(private, 'probe'))],
        stderr=subprocess.PIPE, universal_newlines=True)
    assert probe.returncode != 0 and 'Permission' in probe.stderr
    assert os.stat(path).st_uid == nobody.pw_uid
    pids, errors = hammer('unix:' + path, 4, 10)
    assert not errors, errors[:5]
    assert set(pids) <= set(workers.values())
    assert all(uid_of(p) == nobody.pw_uid for p in pids)


# -- 4. CPU affinity --------------------------------------------------------------------

def test_parse_cpu_list_edge_cases():
    """CPU lists: ranges, spaces, order kept; malformed ones refused."""
    assert processhandler.parse_cpu_list('0') == [0]
    assert processhandler.parse_cpu_list('0,2-3') == [0, 2, 3]
    assert processhandler.parse_cpu_list(' 1 , 3-4 ') == [1, 3, 4]
    assert processhandler.parse_cpu_list('3,1') == [3, 1]
    assert processhandler.parse_cpu_list('2-2') == [2]
    assert processhandler.parse_cpu_list('4095') == [4095]
    for bad in ('', 'a', '1-', '-1', '3-1', '1,,2', '0-4096', '4096',
                '1.5', '0x1', '1-2-3'):
        with pytest.raises(ValueError):
            processhandler.parse_cpu_list(bad)


def test_cpu_affinity_setting_values():
    """cpu_affinity: off words -> None, true words -> True, '0' is the
    list [0] (CPU 0), anything else a CPU list."""
    parse = processhandler.SETTINGS_BY_NAME['cpu_affinity'].parse
    for off in ('', 'off', 'false', 'no', 'False'):
        assert parse(off) is None, off
    for on in ('true', 'on', 'yes', 'TRUE'):
        assert parse(on) is True, on
    assert parse('0') == [0]
    assert parse('1,0') == [1, 0]
    with pytest.raises(ValueError):
        parse('maybe')


def test_affinity_for_slot_edge_cases():
    """Slot i -> the i-th CPU (mod n) of the allowed set (true) or of the
    configured list; an empty pool gives None."""
    afs = processhandler.affinity_for_slot
    assert [afs(True, s, [0, 1]) for s in (1, 2, 3, 4)] == \
        [[0], [1], [0], [1]]
    assert [afs(True, s, [1, 3, 5]) for s in (1, 2, 3, 4)] == \
        [[1], [3], [5], [1]]
    assert afs(True, 7, [2]) == [2]
    assert afs(True, 1, []) is None
    assert afs([0], 5, [0, 1, 2]) == [0]
    assert [afs([3, 1], s, [0]) for s in (1, 2, 3)] == [[3], [1], [3]]
    assert afs([], 1, [0, 1]) is None


def test_get_and_set_affinity_roundtrip_in_child():
    """get_affinity() reads this process's CPUs (as /proc says), and
    set_affinity() pins (in a child, so the test process is untouched).
    On PyPy 3.9 this is the ctypes path."""
    allowed = cpus_allowed(os.getpid())
    assert processhandler.get_affinity() == allowed
    code = ('import sys; sys.path.insert(0, %r); import processhandler as p;'
            'ok = p.set_affinity([%d]); print(ok, p.get_affinity())'
            % (os.path.dirname(PH), allowed[-1]))
    res = subprocess.run([PY, '-c', code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ['True', '[%d]' % allowed[-1]], res.stdout
    if processhandler.IS_PYPY and not processhandler.HAS_SCHED_SETAFFINITY:
        assert processhandler._ctypes_affinity(None) == allowed


def test_cpu_affinity_true_pins_slot_i_to_ith_cpu(proj):
    """cpu_affinity = true, 3 thread workers: slot i runs on the i-th CPU
    (mod n) of the master's allowed set, every thread of it too."""
    typed_config(proj, 'thread', number_workers=3, threads=2, run_time=0.2,
                 cpu_affinity='true')
    master = proj.start_daemon()
    allowed = cpus_allowed(master)
    workers = proj.wait_running(3)
    wait_for(lambda: len(per_pid(proj.events(), 'run_start')) == 3)
    for slot, pid in workers.items():
        want = [allowed[(slot - 1) % len(allowed)]]
        assert cpus_allowed(pid) == want, (slot, pid)
        for task in os.listdir('/proc/%d/task' % pid):
            assert cpus_allowed(pid, int(task)) == want
    assert cpus_allowed(master) == allowed    # the master is not pinned


def test_cpu_affinity_list_zero_puts_every_slot_on_cpu0(proj):
    """cpu_affinity = 0 (a list of one CPU): every slot on CPU 0; after a
    worker is killed its replacement is pinned too."""
    typed_config(proj, 'sync', number_workers=3, cpu_affinity='0')
    proj.start_daemon()
    workers = proj.wait_running(3)
    assert all(cpus_allowed(p) == [0] for p in workers.values())
    os.kill(workers[2], signal.SIGKILL)
    after = wait_for(lambda: (lambda w: w if w and w[2] != workers[2]
                              else None)(proj.running_workers(3)))
    assert cpus_allowed(after[2]) == [0]


def test_cpu_affinity_impossible_cpu_is_logged_worker_still_runs(proj):
    """cpu_affinity naming a CPU that does not exist: the worker still
    runs unpinned and the log says it could not pin (on the ctypes path
    too)."""
    typed_config(proj, 'sync', number_workers=1, cpu_affinity='4000')
    master = proj.start_daemon()
    pid = proj.wait_running(1)[1]
    wait_for(lambda: proj.events('run_end'))
    assert cpus_allowed(pid) == cpus_allowed(master)
    wait_log(proj, 'cannot pin')


# -- 5. USR2 ----------------------------------------------------------------------------

@pytest.mark.parametrize('wtype', ['sync', 'thread'])
def test_usr2_zero_downtime_upgrade(proj, wtype):
    """Clients hammer the port while the master gets USR2: no client sees
    an error, the master keeps its pid (and pidfile), every worker is
    replaced by a new pid, the old ones exit, status still works."""
    echo_config(proj, wtype, threads=2, graceful_timeout=10)
    master = proj.start_daemon()
    old = proj.wait_running(2)
    [name] = listeners(proj)
    stop = threading.Event()
    served = collections.Counter()
    errors = []
    lock = threading.Lock()

    def client(k):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                pid = echo_once(name, b'usr2 %d %d' % (k, i))
            except Exception as e:
                with lock:
                    errors.append(repr(e))
            else:
                with lock:
                    served[pid] += 1
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(served.values()) >= 20, what='traffic')
        os.kill(master, signal.SIGUSR2)
        wait_log(proj, 'upgrade complete', DEADLINE * 2)
        new = wait_for(lambda: (lambda w: w if w and not set(w.values()) &
                                set(old.values()) else None)(
            proj.running_workers(2)), what='new workers')
        wait_for(lambda: not any(alive(p) for p in old.values()),
                 what='old workers gone')
        mark = sum(served[p] for p in new.values())
        wait_for(lambda: sum(served[p] for p in new.values()) >= mark + 20,
                 what='traffic to the new workers')
    finally:
        stop.set()
        for t in threads:
            t.join(DEADLINE * 2)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]
    assert set(served) <= set(old.values()) | set(new.values())
    assert alive(master)
    assert proj.master_pid() == master
    doc = proj.status()
    assert doc is not None and doc['master']['pid'] == master
    assert doc['master']['listeners'] == [name]
    assert 'USR2: re-executing' in proj.log_text()
    res = proj.ph('stop')
    assert res.returncode == 0, res.stderr
    assert not alive(master)


def test_usr2_with_broken_config_is_refused(proj):
    """USR2 while the config file is invalid: the log says 'upgrade
    refused', the same master and workers keep serving."""
    echo_config(proj, 'sync')
    master = proj.start_daemon()
    workers = proj.wait_running(2)
    [name] = listeners(proj)
    with open(proj.config, 'a') as f:
        f.write('number_workers = many\n')
    os.kill(master, signal.SIGUSR2)
    wait_log(proj, 'upgrade refused', DEADLINE * 2)
    assert 'number_workers' in [l for l in proj.log_text().splitlines()
                                if 'upgrade refused' in l][0]
    assert alive(master)
    pids, errors = hammer(name, 4, 10)
    assert not errors
    assert set(pids) <= set(workers.values())
    # status still answers (the control socket was kept) with the same
    # workers: no re-exec happened.
    res = proj.ph('status', '--json', config=proj.config)
    assert res.returncode == 2    # the config itself is broken for the CLI
    assert 'USR2: re-executing' not in proj.log_text()
    assert all(alive(p) for p in workers.values())


# -- 6. systemd ---------------------------------------------------------------------------

def test_systemd_notify_ready_reloading_stopping(proj):
    """With NOTIFY_SOCKET: READY=1 (with STATUS= and MAINPID=) once both
    workers run, RELOADING=1 then READY=1 around a HUP, STOPPING=1 on
    TERM; the master exits 0."""
    typed_config(proj, 'sync', run_time=0.05)
    notify = NotifySocket(os.path.join(proj.path, 'notify.sock'))
    try:
        env = dict(os.environ, NOTIFY_SOCKET=notify.path)
        env.pop('WATCHDOG_USEC', None)
        p = proj.start_foreground(env=env)
        i = notify.wait(lambda m: m.get('READY') == '1', 'READY=1')
        # READY=1 is sent once the workers run: status says so already.
        assert proj.running_workers(2), proj.status()
        first = notify.messages[i][1]
        assert first.get('STATUS') == '2 workers', first
        assert first.get('MAINPID') == str(p.pid), first
        assert not any('RELOADING' in m[1] or 'STOPPING' in m[1]
                       for m in notify.messages[:i])
        os.kill(p.pid, signal.SIGHUP)
        notify.wait(lambda m: m.get('RELOADING') == '1', 'RELOADING=1')
        j = notify.wait(lambda m: m.get('READY') == '1', 'READY=1 again')
        assert notify.messages[j][1].get('STATUS') == '2 workers'
        os.kill(p.pid, signal.SIGTERM)
        notify.wait(lambda m: m.get('STOPPING') == '1', 'STOPPING=1')
        assert p.wait(DEADLINE) == 0, proj.fg_output()
    finally:
        notify.close()


def test_systemd_status_follows_worker_count(proj):
    """TTIN changes the worker count: a STATUS= line with the new count."""
    typed_config(proj, 'sync', number_workers=1)
    notify = NotifySocket(os.path.join(proj.path, 'notify.sock'))
    try:
        p = proj.start_foreground(env=dict(os.environ,
                                           NOTIFY_SOCKET=notify.path))
        notify.wait(lambda m: m.get('READY') == '1', 'READY=1')
        os.kill(p.pid, signal.SIGTTIN)
        notify.wait(lambda m: m.get('STATUS') == '2 workers',
                    'STATUS=2 workers')
        proj.wait_running(2)
    finally:
        notify.close()


def test_systemd_watchdog_pings_at_half_the_interval(proj):
    """WATCHDOG_USEC=200000: WATCHDOG=1 about every 0.1 s while the master
    loop is healthy (mean gap of 15 pings within 0.08..0.3 s, none after
    STOPPING)."""
    typed_config(proj, 'sync', number_workers=1)
    notify = NotifySocket(os.path.join(proj.path, 'notify.sock'))
    try:
        env = dict(os.environ, NOTIFY_SOCKET=notify.path,
                   WATCHDOG_USEC='200000')
        env.pop('WATCHDOG_PID', None)
        p = proj.start_foreground(env=env)

        def pings():
            times = [t for t, m, _ in notify.poll()
                     if m.get('WATCHDOG') == '1']
            return len(times) >= 16 and times
        times = wait_for(pings, DEADLINE, '16 watchdog pings')[:16]
        gaps = [b - a for a, b in zip(times, times[1:])]
        mean = sum(gaps) / len(gaps)
        assert 0.08 <= mean <= 0.3, gaps
        assert max(gaps) < 1.5, gaps
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(DEADLINE) == 0
    finally:
        notify.close()


def test_systemd_watchdog_for_another_pid_is_ignored(proj):
    """WATCHDOG_PID naming another process: no WATCHDOG=1 is sent (READY=1
    still is)."""
    typed_config(proj, 'sync', number_workers=1)
    notify = NotifySocket(os.path.join(proj.path, 'notify.sock'))
    try:
        env = dict(os.environ, NOTIFY_SOCKET=notify.path,
                   WATCHDOG_USEC='200000', WATCHDOG_PID='1')
        p = proj.start_foreground(env=env)
        notify.wait(lambda m: m.get('READY') == '1', 'READY=1')
        os.kill(p.pid, signal.SIGTERM)
        notify.wait(lambda m: m.get('STOPPING') == '1', 'STOPPING=1')
        assert p.wait(DEADLINE) == 0
        notify.poll()
        assert not [m for m in notify.messages if 'WATCHDOG' in m[1]]
    finally:
        notify.close()


SD_WRAPPER = ('import os, sys\n'
              'os.dup2(int(sys.argv[1]), 3)\n'
              'os.environ["LISTEN_PID"] = str(os.getpid())\n'
              'os.environ["LISTEN_FDS"] = "1"\n'
              'os.execv(sys.argv[2], sys.argv[2:])\n')


@pytest.mark.parametrize('wtype', ['sync', 'asyncio'])
def test_systemd_socket_activation(proj, wtype):
    """LISTEN_FDS=1 / LISTEN_PID=<master pid> with the test's listening
    socket as fd 3 and no bind in the config: the workers serve clients
    connecting to the test's socket; status lists it."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(('127.0.0.1', 0))
    lsock.listen(128)
    name = '127.0.0.1:%d' % lsock.getsockname()[1]
    try:
        echo_config(proj, wtype, bind=None, threads=2)
        out = open(os.path.join(proj.path, 'fg.out'), 'ab')
        fd = lsock.fileno()
        p = subprocess.Popen(
            [PY, '-c', SD_WRAPPER, str(fd), PY, PH, '-c', proj.config, '-f'],
            pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, cwd=proj.path, start_new_session=True)
        out.close()
        proj.popens.append(p)
        proj.masters.add(p.pid)
        workers = proj.wait_running(2)
        assert proj.master_pid() == p.pid      # LISTEN_PID matched
        assert listeners(proj) == [name]
        assert 'from systemd' in proj.log_text()
        pids, errors = hammer(name, 4, 15)
        assert not errors, errors[:5]
        assert sum(pids.values()) == 60
        assert set(pids) <= set(workers.values())
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(DEADLINE) == 0, proj.fg_output()
    finally:
        lsock.close()


def test_systemd_listen_pid_mismatch_is_ignored(proj):
    """LISTEN_FDS for another pid (LISTEN_PID not ours) is not used: with
    no bind either, the master runs without listeners."""
    typed_config(proj, 'sync', number_workers=1)
    env = dict(os.environ, LISTEN_FDS='1', LISTEN_PID='1')
    proj.start_foreground(env=env)
    proj.wait_running(1)
    assert listeners(proj) == []


# -- 7. msgpack-RPC example -------------------------------------------------------------

RPC_SKIP = pytest.mark.skipif(
    not HAVE_MSGPACK, reason='msgpack is not importable in %s (pip install '
    'msgpack)' % sys.executable)


def rpc_project(proj):
    """Copy examples/rpc to tmp, start it as a daemon on 127.0.0.1:0;
    return (client module, host, port, master pid)."""
    src = os.path.join(os.path.dirname(PH), 'examples', 'rpc')
    dst = os.path.join(proj.path, 'rpc')
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
        '*.pid', '*.log', '__pycache__'))
    proj.config = os.path.join(dst, 'config.ini')
    proj.pidfile = os.path.join(dst, 'rpc.pid')
    proj.log = os.path.join(dst, 'rpc.log')
    master = proj.start_daemon('--set', 'bind=127.0.0.1:0')
    proj.wait_running(2)
    [name] = listeners(proj)
    host, port = target(name)[1]
    spec = importlib.util.spec_from_file_location(
        'rpc_client_%d' % os.getpid(), os.path.join(dst, 'client.py'))
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    return client, host, port, master


@RPC_SKIP
def test_rpc_example_concurrent_clients(proj):
    """examples/rpc: 8 concurrent clients x 30 calls each get correct
    results; errors from the server come back as RpcError; both workers
    serve."""
    client, host, port, master = rpc_project(proj)
    workers = set(proj.running_workers(2).values())
    results, errors, pids = [], [], set()
    lock = threading.Lock()

    def work(k):
        c = client.Client(host, port, timeout=DEADLINE)
        try:
            for i in range(30):
                got = (c.call('add', k, i), c.call('echo', [k, 'x' * i]))
                with lock:
                    results.append((got, (k + i, [k, 'x' * i])))
            with lock:
                pids.add(c.call('pid'))
        except Exception as e:
            with lock:
                errors.append(repr(e))
        finally:
            c.close()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE * 3)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert len(results) == 240
    assert all(got == want for got, want in results)
    assert pids <= workers
    c = client.Client(host, port, timeout=DEADLINE)
    try:
        with pytest.raises(client.RpcError) as e:
            c.call('nosuch')
        assert 'nosuch' in str(e.value)
        assert c.call('add', 2, 3) == 5    # the connection is still usable
    finally:
        c.close()

    def both_served():
        cs = [client.Client(host, port, timeout=DEADLINE) for _ in range(8)]
        try:
            pids.update(c.call('pid') for c in cs)
        finally:
            for c in cs:
                c.close()
        return pids == workers
    wait_for(both_served, what='both RPC workers serving')


@RPC_SKIP
def test_rpc_notifications_get_no_reply(proj):
    """[2, method, params] notifications are executed but never answered:
    after three notifications the first message that comes back on the
    connection is the response to the following request."""
    client, host, port, master = rpc_project(proj)
    s = socket.create_connection((host, port), DEADLINE)
    try:
        for _ in range(3):
            s.sendall(msgpack.packb([2, 'note', []]))
        s.sendall(msgpack.packb([0, 77, 'notified', []]))
        unpacker = msgpack.Unpacker(raw=False)
        got = []
        while not got:
            data = s.recv(65536)
            assert data, 'connection closed'
            unpacker.feed(data)
            got.extend(unpacker)
        assert got == [[1, 77, None, 3]], got
    finally:
        s.close()
    c = client.Client(host, port, timeout=DEADLINE)
    try:
        c.notify('note')
        assert c.call('add', 1, 1) == 2
    finally:
        c.close()


@RPC_SKIP
@pytest.mark.parametrize('retries', [0, 1])
def test_rpc_worker_killed_mid_call(proj, retries):
    """A worker is KILLed while a client is inside rpc_sleep: without
    retries the client gets RpcError at once (well before the 5 s sleep
    would end); with retries=1 the call is redone on a new connection and
    succeeds.  Never a hang; the slot gets a replacement and new calls
    succeed."""
    client, host, port, master = rpc_project(proj)
    before = proj.running_workers(2)
    c = client.Client(host, port, timeout=30)
    victim = c.call('pid')           # the worker holding this connection
    assert victim in before.values()
    outcome = {}
    sleep = 5 if retries == 0 else 1
    sent = threading.Event()

    def call():
        t0 = time.monotonic()
        sent.set()
        try:
            outcome['result'] = c.call('sleep', sleep, retries=retries)
        except client.RpcError as e:
            outcome['error'] = e
        outcome['took'] = time.monotonic() - t0
    t = threading.Thread(target=call)
    t.start()
    try:
        wait_for(sent.is_set)
        if not processhandler.IS_PYPY:
            # CPython's time.sleep is clock_nanosleep: wait until a thread
            # of the victim is in it, i.e. inside rpc_sleep.  (PyPy sleeps
            # in select(), like an idle accept: not distinguishable.)
            wait_for(lambda: any('nanosleep' in w
                                 for w in thread_wchans(victim)),
                     what='worker inside rpc_sleep')
        os.kill(victim, signal.SIGKILL)
        t.join(DEADLINE)
        assert not t.is_alive(), 'client hung'
    finally:
        c.close()
        t.join(DEADLINE)
    if retries == 0:
        assert 'error' in outcome, outcome
        assert 'connection failed during sleep' in str(outcome['error'])
        assert outcome['took'] < 4.5, outcome
    else:
        assert outcome.get('result') == sleep, outcome
    after = wait_for(lambda: (lambda w: w if w and victim not in w.values()
                              else None)(proj.running_workers(2)),
                     what='replacement worker')
    assert set(after) == {1, 2}
    c2 = client.Client(host, port, timeout=DEADLINE)
    try:
        for i in range(10):
            assert c2.call('add', i, 1) == i + 1
    finally:
        c2.close()


def thread_wchans(pid):
    out = []
    try:
        tasks = os.listdir('/proc/%d/task' % pid)
    except OSError:
        return out
    for task in tasks:
        try:
            with open('/proc/%d/task/%s/wchan' % (pid, task)) as f:
                out.append(f.read())
        except OSError:
            pass
    return out
