"""The user code the benchmarks run, one file for every system.

* processhandler workers (``worker_class = agents:Idle`` ...), imported by
  the master with bench/ on PYTHONPATH;
* ``python agents.py pool MODE ...``: a multiprocessing.Pool driver (the
  Pool's parent is the "master" the harness measures);
* ``python agents.py peer MODE ...``: the program circus and supervisor run;
* ``python agents.py bare SECONDS EVENTS``: the bare loop that loop overhead
  is compared with;
* ``agents:app`` and ``gunicorn_hook``: the WSGI app gunicorn serves.

Every event is one line ``KIND PID MONOTONIC EXTRA`` written with a single
write() to the harness's FIFO (or file) named by the config key / argument
``events``.  time.monotonic() is CLOCK_MONOTONIC, system-wide on Linux, so
the harness compares these stamps with its own.
"""
import os
import signal
import sys
import time


def note(path, kind, extra=''):
    line = ('%s %d %.6f %s\n' % (kind, os.getpid(), time.monotonic(),
                                 extra)).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
    except OSError:
        return   # the harness is gone (FIFO without a reader)
    try:
        os.set_blocking(fd, True)
        os.write(fd, line)
    except OSError:
        pass
    finally:
        os.close(fd)


def job(*args):
    """The trivial job of every throughput benchmark."""
    return True


try:
    import processhandler
except ImportError:       # gunicorn / circus / supervisor venv
    processhandler = None

if processhandler is not None:
    class Idle(processhandler.Worker):
        """Boots (user code runs: a stamp), then waits for work that never
        comes; a stop wakes it at once."""

        def init(self):
            note(self.cfg.events, 'boot')

        def run(self):
            self.sleep(3600)
            return False

    class Spin(processhandler.Worker):
        """run() returns True at once: the loop's own cost per run."""

        def init(self):
            note(self.cfg.events, 'boot')
            self.t0 = time.monotonic()
            self.c0 = time.process_time()

        def run(self):
            return True

        def after_run(self):
            note(self.cfg.events, 'count', '%d %.6f %.6f' % (
                self.requests, time.monotonic() - self.t0,
                time.process_time() - self.c0))

    class Echo(processhandler.Worker):
        """A socket worker: echo one message per connection."""

        def init(self):
            note(self.cfg.events, 'boot')

        def handle(self, conn, addr):
            data = conn.recv(4096)
            if data:
                conn.sendall(data)


# -- gunicorn ---------------------------------------------------------------

def app(environ, start_response):
    start_response('200 OK', [('Content-Type', 'text/plain'),
                              ('Content-Length', '2')])
    return [b'ok']


def gunicorn_hook(worker):
    """post_worker_init: the worker is about to serve (user code runs)."""
    note(os.environ['BENCH_EVENTS'], 'boot')


# -- the bare loop ------------------------------------------------------------

class _Stop(object):
    alive = True


def bare(seconds, events):
    """The same run() in a plain ``while alive`` loop, stopped by a timer."""
    if processhandler is not None:
        w = Spin()
    else:
        class W(object):
            def run(self):
                return True
        w = W()
    w.alive = True

    def stop(signum, frame):
        w.alive = False
    signal.signal(signal.SIGALRM, stop)
    run = w.run
    n = 0
    t0 = time.monotonic()
    c0 = time.process_time()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    while w.alive:
        if run():
            n += 1
    note(events, 'count', '%d %.6f %.6f' % (n, time.monotonic() - t0,
                                            time.process_time() - c0))


# -- multiprocessing.Pool --------------------------------------------------------

def _pool_boot(events):
    note(events, 'boot')


def _until_term():
    def term(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, term)
    while True:
        signal.pause()


def pool(mode, args):
    import multiprocessing
    ctx = multiprocessing.get_context('fork')
    if mode == 'idle':            # idle N EVENTS: workers wait for tasks
        n, events = int(args[0]), args[1]
        p = ctx.Pool(n, initializer=_pool_boot, initargs=(events,))
        try:
            _until_term()
        finally:
            p.terminate()
            p.join()
    elif mode == 'recycle':       # recycle MAXTASKS SECONDS EVENTS
        maxtasks, seconds, events = int(args[0]), float(args[1]), args[2]
        p = ctx.Pool(2, maxtasksperchild=maxtasks)
        try:
            p.map(job, range(4), chunksize=1)      # the pool is up
            n = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                n += len(p.map(job, range(20), chunksize=1))
            note(events, 'count', '%d %.6f' % (n, time.monotonic() - t0))
        finally:
            p.terminate()
            p.join()
    elif mode == 'loop':          # loop SECONDS EVENTS: one worker, no recycle
        seconds, events = float(args[0]), args[1]
        p = ctx.Pool(1)
        try:
            p.map(job, range(4), chunksize=1)
            n = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                n += len(p.map(job, range(500), chunksize=1))
            note(events, 'count', '%d %.6f' % (n, time.monotonic() - t0))
        finally:
            p.terminate()
            p.join()
    else:
        raise SystemExit('unknown pool mode %r' % mode)


# -- circus / supervisor programs ------------------------------------------------

def peer(mode, args):
    if mode == 'idle':            # idle EVENTS
        note(args[0], 'boot')
        signal.signal(signal.SIGTERM, lambda s, f: os._exit(0))
        while True:
            signal.pause()
    elif mode == 'recycle':       # recycle N EVENTS: N jobs, then exit 0
        n, events = int(args[0]), args[1]
        note(events, 'boot')
        t0 = time.monotonic()
        done = 0
        for _ in range(n):
            if job():
                done += 1
        note(events, 'count', '%d %.6f' % (done, time.monotonic() - t0))
    else:
        raise SystemExit('unknown peer mode %r' % mode)


if __name__ == '__main__':
    what, rest = sys.argv[1], sys.argv[2:]
    if what == 'pool':
        pool(rest[0], rest[1:])
    elif what == 'peer':
        peer(rest[0], rest[1:])
    elif what == 'bare':
        bare(float(rest[0]), rest[1])
    else:
        raise SystemExit('usage: agents.py pool|peer|bare ...')
