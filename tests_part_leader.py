"""Multi-machine features (issue 5): the Redis leader lock (active/standby
masters, failover, fencing by time, compare-and-delete) and the reliable
Redis queue example, against a REAL redis-server started on a free port.

Every master, worker and redis-server started here is tracked by pid and
killed at teardown; waiting is ``wait_for`` or a bounded polling loop.
"""
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import threading
import time

import pytest

import processhandler
from test_processhandler import (
    DEADLINE, PH, PY, alive, descendants, free_port, ppid_of, proj,
    wait_for)

REDIS_SERVER = shutil.which('redis-server') or '/usr/bin/redis-server'
EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(PH)), 'examples',
                       'redis_queue')

QUIET_WORKER = '''
import time
import processhandler

class Quiet(processhandler.Worker):
    def run(self):
        # run_time long (e.g. 30): a worker that does not finish its run on
        # TERM, so only the master's KILL deadline can end it.
        time.sleep(float(self.cfg.get('run_time', '0.05')))
        return True

    def after_run(self):
        # exit_time: a graceful exit that takes this long (cleanup work).
        time.sleep(float(self.cfg.get('exit_time', '0')))
'''


# -- a real redis-server ---------------------------------------------------------

class RedisServer(object):
    """redis-server in the foreground (we own its pid) on a fixed port,
    stoppable and restartable on that same port."""

    def __init__(self, path):
        import redis
        self.redis = redis
        self.dir = str(path)
        self.port = free_port()
        self.url = 'redis://127.0.0.1:%d/0' % self.port
        self.logpath = os.path.join(self.dir, 'redis-server.log')
        self.proc = None
        self.client = redis.Redis(host='127.0.0.1', port=self.port,
                                  socket_timeout=5, socket_connect_timeout=5)

    def start(self):
        log = open(self.logpath, 'ab')
        try:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, '--port', str(self.port),
                 '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
                 '--daemonize', 'no', '--dir', self.dir],
                stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        finally:
            log.close()
        wait_for(self.ping, DEADLINE, 'redis-server answering PING on %d'
                 % self.port)
        # Connections of the pool may point at a previous server.
        self.client.connection_pool.disconnect()

    def ping(self):
        if self.proc.poll() is not None:
            with open(self.logpath) as f:
                raise AssertionError('redis-server exited %s:\n%s' % (
                    self.proc.returncode, f.read()[-2000:]))
        try:
            probe = self.redis.Redis(host='127.0.0.1', port=self.port,
                                     socket_timeout=1,
                                     socket_connect_timeout=1)
            try:
                return probe.ping()
            finally:
                probe.connection_pool.disconnect()
        except (self.redis.exceptions.RedisError, OSError):
            return False

    def stop(self, sig=signal.SIGKILL):
        """Stop the server (SIGKILL: a crash); return when it is reaped."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(DEADLINE)
        self.client.connection_pool.disconnect()

    def pause(self):
        """SIGSTOP: a hung server / a partition (connections time out)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)
        wait_for(self.ping, DEADLINE, 'redis-server answering again')
        self.client.connection_pool.disconnect()

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server: ``.url``, ``.port``, ``.client``,
    ``.stop()`` / ``.start()`` (same port), killed by pid at teardown."""
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip('redis-server is not installed (apt-get install '
                    'redis-server)')
    pytest.importorskip('redis')
    d = tmp_path / 'redis'
    d.mkdir()
    server = RedisServer(d)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        assert server.proc.poll() is not None


# -- masters sharing one lock ------------------------------------------------------

class Master(object):
    """One master of a pair: its own config, pidfile and log."""

    def __init__(self, proj, name, **keys):
        self.proj = proj
        self.name = name
        self.config = os.path.join(proj.path, name + '.ini')
        self.pidfile = os.path.join(proj.path, name + '.pid')
        self.log = os.path.join(proj.path, name + '.log')
        self.pid = None
        values = dict(worker_class='quiet:Quiet', number_workers=2,
                      pidfile=self.pidfile, log_file=self.log,
                      graceful_timeout=2)
        values.update(keys)
        with open(self.config, 'w') as f:
            f.write('[job]\n' + ''.join('%s = %s\n' % kv
                                        for kv in values.items()))

    def start(self):
        res = self.proj.ph('start', '-d', config=self.config)
        assert res.returncode == 0, (res.stdout, res.stderr, self.log_text())
        with open(self.pidfile) as f:
            self.pid = int(f.read().strip())
        self.proj.masters.add(self.pid)
        return res

    def status(self):
        res = self.proj.ph('status', '--json', config=self.config)
        if res.returncode != 0:
            return None
        doc = json.loads(res.stdout)
        for w in doc['workers']:
            if w.get('pid'):
                self.proj.workers.add(w['pid'])
        return doc

    def workers(self):
        """Live (not zombie) workers of this master, from /proc."""
        if self.pid is None or not alive(self.pid):
            return []
        return [p for p in descendants(self.pid) if alive(p)]

    def running(self, n=2):
        """The status document when active with ``n`` running workers."""
        doc = self.status()
        if doc and doc['master']['state'] == 'active' and sum(
                w['state'] == 'running' for w in doc['workers']) == n:
            return doc
        return None

    def log_text(self):
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ''


class Sampler(object):
    """Samples, every ``period`` seconds in a thread, the live workers of
    each master from /proc.  A master's workers are remembered, so workers
    that outlive a SIGKILLed master (re-parented) are still seen; zombies
    and pids reused by other programs are not counted."""

    def __init__(self, masters, period=0.025):
        self.masters = masters
        self.period = period
        self.known = dict((m.name, set()) for m in masters)
        self.samples = []            # (monotonic, {name: [live pids]})
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.loop)
        self.thread.daemon = True
        self.error = None

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(10)

    @staticmethod
    def is_worker(pid):
        try:
            with open('/proc/%d/comm' % pid) as f:
                return 'worker' in f.read()
        except OSError:
            return False

    @staticmethod
    def children(pid):
        """Children of a (single-threaded) master: /proc's children file,
        cheap enough to read every 25 ms; a /proc walk where it is missing."""
        try:
            with open('/proc/%d/task/%d/children' % (pid, pid)) as f:
                return [int(p) for p in f.read().split()]
        except FileNotFoundError:
            if os.path.exists('/proc/%d' % pid):
                return [p for p in descendants(pid) if ppid_of(p) == pid]
            return []
        except (OSError, ValueError):
            return []

    def sample(self):
        t = time.monotonic()
        live = {}
        for m in self.masters:
            if m.pid is not None:
                self.known[m.name].update(self.children(m.pid))
            live[m.name] = sorted(p for p in self.known[m.name]
                                  if alive(p) and self.is_worker(p))
        self.samples.append((t, live))
        return live

    def loop(self):
        try:
            while not self.stop_event.is_set():
                self.sample()
                self.stop_event.wait(self.period)
        except Exception as e:            # reported by check()
            self.error = e

    def overlaps(self):
        return [(t, live) for t, live in self.samples
                if sum(1 for pids in live.values() if pids) > 1]

    def check(self, proj):
        assert self.error is None, self.error
        for pids in self.known.values():
            proj.workers.update(pids)
        assert len(self.samples) > 10
        bad = self.overlaps()
        assert not bad, 'both masters had workers at %d sample(s): %s' % (
            len(bad), bad[:3])

    def last_with_workers(self, name, before):
        for t, live in reversed(list(self.samples)):
            if t <= before and live[name]:
                return t
        return None

    def first_with_workers(self, name, after):
        for t, live in list(self.samples):
            if t >= after and live[name]:
                return t
        return None


def leader_pair(proj, redis_server, ttl, key='lead', **keys):
    proj.write_module('quiet', QUIET_WORKER)
    lock = '%s?key=%s' % (redis_server.url, key)
    return [Master(proj, name, leader_lock=lock, leader_ttl=ttl, **keys)
            for name in ('a', 'b')]


def active_one(masters, n=2):
    """The one master that is active with ``n`` running workers while every
    other is on standby with none; None otherwise."""
    docs = [m.status() for m in masters]
    if any(d is None for d in docs):
        return None
    act = [m for m, d in zip(masters, docs)
           if d['master']['state'] == 'active']
    if len(act) != 1:
        return None
    for m, d in zip(masters, docs):
        running = [w for w in d['workers'] if w['state'] == 'running']
        if m is act[0] and len(running) != n:
            return None
        if m is not act[0] and d['workers']:
            return None
    return act[0], dict((m.name, d) for m, d in zip(masters, docs))


# -- tests -----------------------------------------------------------------------

def test_redis_failover_after_sigkill_never_two_active(redis_server, proj):
    """Two masters share a Redis lock: exactly one is active with workers,
    the other stands by with none and reports the active one as holder.
    SIGKILL of the active master: the standby takes over within
    leader_ttl + 2 s, and at no sampled moment (every 25 ms, via /proc)
    do both masters have live workers.  Repeated 3 times."""
    ttl = 2.0
    masters = leader_pair(proj, redis_server, ttl)
    times = []
    with Sampler(masters) as sampler:
        masters[0].start()
        res = masters[1].start()
        assert 'standby' in res.stdout, res.stdout
        active, docs = wait_for(lambda: active_one(masters), DEADLINE,
                                'one active master, one standby')
        for round_ in range(3):
            standby = [m for m in masters if m is not active][0]
            if round_ == 0:
                token = docs[active.name]['master']['leader']['token']
                assert docs[active.name]['master']['leader']['holder'] == \
                    token
                assert docs[standby.name]['master']['leader']['holder'] == \
                    token
                assert docs[standby.name]['master']['leader']['token'] != \
                    token
                assert redis_server.client.get('lead').decode() == token
            else:                 # /proc only: fewer CLI runs per round
                wait_for(lambda: len(active.workers()) == 2, DEADLINE,
                         '%s with 2 workers' % active.name)
            assert not standby.workers()
            victims = active.workers()
            assert len(victims) == 2
            t_kill = time.monotonic()
            os.kill(active.pid, signal.SIGKILL)
            wait_for(lambda: sampler.first_with_workers(standby.name, t_kill),
                     ttl + DEADLINE, 'the standby %s spawning workers'
                     % standby.name)
            took = sampler.first_with_workers(standby.name, t_kill) - t_kill
            times.append(took)
            assert not any(alive(p) for p in victims)
            assert took < ttl + 2.0, took
            # The killed one comes back, as the standby of the next round.
            res = active.start()
            assert 'standby' in res.stdout, res.stdout
            active = standby
        final, docs = wait_for(lambda: active_one(masters), DEADLINE,
                                'one active master, one standby')
        assert final is active
    sampler.check(proj)
    print('\nredis failover (ttl %gs, SIGKILL -> standby spawns workers): '
          'median %.3fs, all %s' % (ttl, statistics.median(times),
                                     ' '.join('%.3f' % t for t in times)))


def test_graceful_stop_releases_lock_for_fast_handover(redis_server, proj):
    """`stop` of the active master deletes its lock (compare-and-delete)
    once its workers are gone: the key no longer holds its token when stop
    returns, and the standby is active long before the lease (10 s) could
    have expired."""
    ttl = 10.0
    a, b = masters = leader_pair(proj, redis_server, ttl)
    with Sampler(masters) as sampler:
        a.start()
        wait_for(lambda: a.running(), DEADLINE, 'a active')
        b.start()
        token = a.status()['master']['leader']['token']
        assert redis_server.client.get('lead').decode() == token
        assert redis_server.client.pttl('lead') > (ttl - 4) * 1000
        t0 = time.monotonic()
        res = proj.ph('stop', config=a.config)
        assert res.returncode == 0, res.stderr
        held = redis_server.client.get('lead')
        assert held is None or held.decode() != token, held
        assert not alive(a.pid)
        wait_for(lambda: sampler.first_with_workers('b', t0), DEADLINE,
                 'b spawning workers')
        t_b = sampler.first_with_workers('b', t0)
        # From a's last worker seen alive to b's first: a lease expiry
        # would leave a gap of > 6.6 s (renewed every ttl/3 until then).
        took = t_b - sampler.last_with_workers('a', t_b)
        assert took < 3.0, took
        wait_for(lambda: b.running(), DEADLINE, 'b active')
    sampler.check(proj)
    assert 'leader lock released' in a.log_text()
    print('\nhandover after graceful stop: b spawned workers %.3fs after '
          "a's last worker was seen, %.3fs after `stop` was run"
          % (took, t_b - t0))


def test_slow_graceful_stop_keeps_the_lease_until_workers_are_gone(
        redis_server, proj):
    """A graceful stop whose workers take longer than leader_ttl to finish
    their runs: the stopping master keeps renewing its lease until its last
    worker is gone (then releases it), so the standby never runs workers
    alongside the old ones."""
    ttl = 2.0
    a, b = masters = leader_pair(proj, redis_server, ttl, exit_time=ttl + 1,
                                 graceful_timeout=10)
    with Sampler(masters) as sampler:
        a.start()
        wait_for(lambda: a.running(), DEADLINE, 'a active')
        b.start()
        victims = a.workers()
        t0 = time.monotonic()
        res = proj.ph('stop', config=a.config)
        assert res.returncode == 0, res.stderr
        stop_took = time.monotonic() - t0
        assert stop_took > ttl, stop_took      # the workers outlived a TTL
        assert not any(alive(p) for p in victims)
        wait_for(lambda: b.running(), DEADLINE, 'b active')
    sampler.check(proj)
    log = a.log_text()
    assert 'leader lock released' in log, log
    print('\nslow graceful stop: %.3fs (ttl %g), no overlap' % (stop_took,
                                                                ttl))


@pytest.mark.parametrize('how', ['crash', 'hang'])
def test_redis_down_active_stands_down_before_lease_expiry(redis_server,
                                                           proj, how):
    """Redis dies (crash: SIGKILL, connections refused) or hangs (SIGSTOP,
    like a partition: calls time out) under an active master whose workers
    do not finish their run on TERM: the master logs 'standing down' and
    its workers are all dead (KILLed at the fencing deadline) less than
    leader_ttl after Redis went away, i.e. before its lease could have
    expired; the standby stays without workers.  Redis back (restarted on
    the same port, or resumed): exactly one master becomes active again,
    and never both."""
    ttl = 3.0
    a, b = masters = leader_pair(proj, redis_server, ttl, run_time=30)
    with Sampler(masters) as sampler:
        a.start()
        wait_for(lambda: a.running(), DEADLINE, 'a active')
        b.start()
        victims = a.workers()
        assert len(victims) == 2
        t_before = time.monotonic()
        pttl = redis_server.client.pttl('lead')
        t_stop = time.monotonic()
        if how == 'crash':
            redis_server.stop()
        else:
            redis_server.pause()
        # Tight polling: the moment the last worker is gone.
        deadline = t_stop + ttl + DEADLINE
        while any(alive(p) for p in victims):
            assert time.monotonic() < deadline, 'workers still alive'
            time.sleep(0.01)
        t_dead = time.monotonic()
        after_stop = t_dead - t_stop
        assert after_stop < ttl, after_stop
        log = a.log_text()
        assert 'standing down' in log, log
        doc = a.status()
        assert doc['master']['state'] == 'standby' and not doc['workers'], doc
        assert not b.workers()
        assert b.status()['master']['state'] == 'standby'
        print('\nredis %s: last worker dead %.3fs after redis went away '
              '(ttl %g), %.3fs before the lease (PTTL %d ms) expired' % (
                  how, after_stop, ttl, t_before + pttl / 1000.0 - t_dead,
                  pttl))
        t_restart = time.monotonic()
        if how == 'crash':
            redis_server.start()
        else:
            redis_server.resume()
        winner, docs = wait_for(lambda: active_one(masters), DEADLINE,
                                'one master active again')
        print('redis back: %s active %.3fs after restart' % (
            winner.name, time.monotonic() - t_restart))
        assert redis_server.client.get('lead').decode() == \
            docs[winner.name]['master']['leader']['token']
    sampler.check(proj)


def test_lock_taken_by_other_stands_down_at_next_renew(redis_server, proj):
    """Someone else's token overwrites the key: the active master notices at
    its next renew (every ttl/3), logs that it lost the lock to 'other',
    stops its workers and stands by; stopping it then leaves the other
    holder's key alone."""
    ttl = 3.0
    proj.write_module('quiet', QUIET_WORKER)
    a = Master(proj, 'a', leader_lock='%s?key=lead' % redis_server.url,
               leader_ttl=ttl)
    a.start()
    wait_for(lambda: a.running(), DEADLINE, 'a active')
    victims = a.workers()
    r = redis_server.client
    t_set = time.monotonic()
    r.set('lead', 'other', px=60000)
    deadline = t_set + ttl + DEADLINE
    while any(alive(p) for p in victims):
        assert time.monotonic() < deadline, 'workers still alive'
        time.sleep(0.01)
    took = time.monotonic() - t_set
    proj.workers.update(victims)
    # Next renew within ttl/3, then the workers' graceful stop (quick).
    assert took < ttl, took
    log = a.log_text()
    assert 'standing down: lost the leader lock (taken by other)' in log, log
    doc = wait_for(lambda: (lambda d: d if d and d['master']['state'] ==
                            'standby' else None)(a.status()))
    assert doc['workers'] == [] and not a.workers()
    assert doc['master']['leader']['holder'] == 'other'
    assert 'lease_left' not in doc['master']['leader']
    assert proj.ph('stop', config=a.config).returncode == 0
    assert r.get('lead') == b'other'
    print('\nlost lock: workers stopped %.3fs after the key was taken' % took)


def test_stop_never_deletes_another_holders_key(redis_server, proj):
    """Compare-and-delete: a master that still believes it is active (the
    key was overwritten right after its renew, before the next one) and is
    stopped, releases the lock only if the key holds its own token: the
    other holder's key survives the stop."""
    ttl = 9.0                       # renew every 3 s: a wide window
    proj.write_module('quiet', QUIET_WORKER)
    a = Master(proj, 'a', leader_lock='%s?key=lead' % redis_server.url,
               leader_ttl=ttl)
    a.start()
    wait_for(lambda: a.running(), DEADLINE, 'a active')
    r = redis_server.client
    # Just after a renew (PTTL close to the full TTL) ...
    wait_for(lambda: r.pttl('lead') > ttl * 1000 - 300, 2 * ttl,
             'a fresh renew')
    r.set('lead', 'other', px=60000)
    # ... TERM the master directly: it stops before its next renew.
    os.kill(a.pid, signal.SIGTERM)
    wait_for(lambda: not alive(a.pid), DEADLINE, 'a gone')
    log = a.log_text()
    assert 'standing down' not in log, log     # it stopped while active
    assert 'leader lock not released: it is held by other now' in log, log
    assert r.get('lead') == b'other'
    assert 0 < r.pttl('lead') <= 60000


def test_standby_takes_a_key_holding_its_own_token(redis_server, proj):
    """A key that holds the standby's own token (a SET of its own that
    timed out on a hung Redis but ran when the server resumed) is the
    standby's: it becomes active at its next poll instead of waiting for
    the key to expire, and renews it."""
    ttl = 10.0
    proj.write_module('quiet', QUIET_WORKER)
    b = Master(proj, 'b', leader_lock='%s?key=lead' % redis_server.url,
               leader_ttl=ttl)
    r = redis_server.client
    r.set('lead', 'other', px=60000)
    res = b.start()
    assert 'standby' in res.stdout, res.stdout
    token = b.status()['master']['leader']['token']
    assert r.get('lead') == b'other'
    t0 = time.monotonic()
    r.set('lead', token, px=int(ttl * 1000))
    wait_for(lambda: b.workers(), DEADLINE, 'b spawning workers')
    took = time.monotonic() - t0
    assert took < ttl / 2, took
    wait_for(lambda: b.running(), DEADLINE, 'b active')
    assert r.get('lead').decode() == token
    print('\nown token recognised: active %.3fs after the key was set' % took)


def test_standby_status_exit_code_and_holder(redis_server, proj):
    """`status` of the standby master exits 0 and says standby; its
    `status --json` names the active master's token as the lock holder,
    with the lock's URL and key, and has no lease."""
    masters = leader_pair(proj, redis_server, 3.0, key='who')
    a, b = masters
    a.start()
    wait_for(lambda: a.running(), DEADLINE, 'a active')
    res = b.start()
    assert 'standby' in res.stdout
    text = proj.ph('status', config=b.config)
    assert text.returncode == 0, text.stderr
    assert 'standby' in text.stdout and str(b.pid) in text.stdout
    token = a.status()['master']['leader']['token']
    assert 'held by %s\n' % token in text.stdout, text.stdout
    text = proj.ph('status', config=a.config)
    assert text.returncode == 0 and ' active,' in text.stdout
    assert 'held by %s (this master), lease' % token in text.stdout, \
        text.stdout
    doc = b.status()
    active = a.status()
    assert doc['master']['state'] == 'standby' and doc['workers'] == []
    assert active['master']['state'] == 'active'
    lead = doc['master']['leader']
    assert lead['holder'] == active['master']['leader']['token']
    assert lead['holder'] != lead['token']
    assert 'who' in lead['lock'] and str(redis_server.port) in lead['lock']
    assert 'lease_left' not in lead
    assert 0 < active['master']['leader']['lease_left'] <= 3.0


# -- reliable queue example --------------------------------------------------------

def queue_project(proj):
    """The example copied into the test folder; returns its config path."""
    dest = os.path.join(proj.path, 'redis_queue')
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns(
        '*.pyc', '__pycache__', '*.log', '*.pid'))
    return os.path.join(dest, 'config.ini')


def push_jobs(proj, redis_server, n):
    res = subprocess.run([PY, os.path.join(proj.path, 'redis_queue',
                                           'producer.py'), str(n),
                          redis_server.url, 'jobs'],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert redis_server.client.llen('jobs') == n


def process_age(pid):
    """Seconds since ``pid`` started (from /proc), 0 if unknown."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            start = int(f.read().rsplit(')', 1)[1].split()[19])
        with open('/proc/uptime') as f:
            uptime = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return 0.0
    return uptime - start / float(os.sysconf('SC_CLK_TCK'))


def processing_left(r):
    keys = list(r.scan_iter('jobs:processing:*'))
    return dict((k, r.llen(k)) for k in keys if r.llen(k))


def start_queue(proj, config, redis_server, work_time):
    res = proj.ph('start', '-d', '--set', 'redis_url=' + redis_server.url,
                  '--set', 'work_time=%s' % work_time, config=config)
    qdir = os.path.dirname(config)
    log = os.path.join(qdir, 'queue.log')
    assert res.returncode == 0, (res.stdout, res.stderr,
                                 open(log).read() if os.path.exists(log)
                                 else '')
    with open(os.path.join(qdir, 'queue.pid')) as f:
        master = int(f.read().strip())
    proj.masters.add(master)
    return master


def test_reliable_queue_no_job_lost_under_sigkill(redis_server, proj):
    """5000 jobs, 4 workers, a random worker SIGKILLed every 100 ms while
    the queue drains: in the end the queue and every processing list are
    empty and every job was done at least once (duplicates are counted and
    reported; lost must be 0)."""
    n = 5000
    config = queue_project(proj)
    r = redis_server.client
    push_jobs(proj, redis_server, n)
    master = start_queue(proj, config, redis_server, 0.001)
    rng = random.Random()
    kills = 0
    t0 = time.monotonic()
    deadline = t0 + 20          # bounded: then the rest drains unharmed
    next_kill = t0
    # A worker dying within EARLY_DEATH of its boot counts as a crash loop
    # and its slot backs off (exponentially): victims are older than that,
    # so each kill is replaced at once and the queue keeps draining.
    min_age = processhandler.Arbiter.EARLY_DEATH + 0.2
    while r.llen('jobs') and time.monotonic() < deadline:
        workers = [p for p in descendants(master)
                   if alive(p) and process_age(p) >= min_age]
        if workers:
            victim = rng.choice(workers)
            proj.workers.add(victim)
            try:
                os.kill(victim, signal.SIGKILL)
                kills += 1
            except OSError:
                pass
        # The kill rate is the test's input, not a wait for a condition.
        next_kill += 0.1
        time.sleep(max(0.0, next_kill - time.monotonic()))
    left_in_queue = r.llen('jobs')
    wait_for(lambda: r.llen('jobs') == 0 and not processing_left(r),
             60, 'queue and processing lists empty (left %d, %s, done %d)'
             % (r.llen('jobs'), processing_left(r), r.hlen('jobs:done')))
    drained = time.monotonic() - t0
    counts = [int(v) for v in r.hvals('jobs:done')]
    done = len(counts)
    duplicates = sum(counts) - n
    lost = n - done
    print('\nreliable queue: %d jobs in %.1fs, %d kills, %d duplicates, '
          '%d lost (queue had %d left when killing stopped)' % (
              n, drained, kills, duplicates, lost, left_in_queue))
    assert set(r.hkeys('jobs:done')) == set(
        ('job-%d' % i).encode() for i in range(n))
    assert lost == 0
    assert kills >= 5, kills
    assert duplicates <= kills
    assert proj.ph('stop', config=config).returncode == 0
    assert not processing_left(r)


def test_reliable_queue_graceful_stop_finishes_jobs_in_flight(
        redis_server, proj):
    """`stop` while 4 workers drain the queue: each finishes the job it
    holds, so every processing list is empty afterwards, and every job is
    either done exactly once or still waiting in the queue."""
    n = 3000
    config = queue_project(proj)
    r = redis_server.client
    push_jobs(proj, redis_server, n)
    master = start_queue(proj, config, redis_server, 0.01)
    wait_for(lambda: r.hlen('jobs:done') >= 100, DEADLINE, '100 jobs done')
    # Mid-job: at least one processing list holds a job right now.
    wait_for(lambda: processing_left(r), DEADLINE, 'a job in flight')
    res = proj.ph('stop', config=config)
    assert res.returncode == 0, res.stderr
    assert not alive(master)
    assert processing_left(r) == {}
    waiting = r.llen('jobs')
    counts = [int(v) for v in r.hvals('jobs:done')]
    assert waiting > 0                       # it was stopped mid-drain
    assert set(counts) == {1}
    assert len(counts) + waiting == n
    print('\ngraceful stop of the queue: %d done, %d waiting, processing '
          'lists empty' % (len(counts), waiting))
