"""python3 bench/loop_profile.py: evidence for the loop-overhead report: core Worker._loop vs bare loop vs a
variant of _loop with the per-run memory check hoisted (prototype only)."""
import os
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import processhandler as ph
from processhandler import Scoreboard, MemoryCheck
N = 1000000
INF = float('inf')

class Spin(ph.Worker):
    def run(self):
        return True

class Opt(Spin):
    def _loop(self):
        run = self.run
        q, d = self._board.q, self._board.d
        base = self._cell * Scoreboard.FIELDS
        i_req, i_started = base + Scoreboard.REQUESTS, base + Scoreboard.RUN_STARTED
        max_requests = self._max_requests()
        interval = self.setting('interval')
        timed = self.setting('timeout') > 0
        monotonic = time.monotonic
        memory = MemoryCheck(self)
        next_mem = memory.next          # inf without a soft limit
        check_parent = self._check_parent
        requests = self.requests
        while self.alive:
            if timed:
                now = d[i_started] = monotonic()
            handled = run()
            if timed:
                d[i_started] = 0.0
            if handled:
                requests += 1
                self.requests = q[i_req] = requests
                if max_requests and requests >= max_requests:
                    break
            if next_mem != INF and (now if timed else monotonic()) >= next_mem:
                next_mem = monotonic() + memory.every
                if memory.over_soft():
                    break
            if check_parent and os.getppid() != self.ppid:
                break
            if interval and self.alive:
                self.sleep(interval)

def stopper(w):
    # stop after N runs without touching run(): count via requests in a signal
    import signal
    signal.signal(signal.SIGALRM, lambda s, f: setattr(w, 'alive', False))

def measure(cls, extra, secs=1.0):
    import signal
    cfg = ph.Config(dict(extra))
    w = cls()
    board = Scoreboard(16); cell = board.alloc()
    r, wfd = os.pipe()
    w._boot(cfg, 1, board, cell, wfd, os.getppid(), [], None, True)
    signal.signal(signal.SIGALRM, lambda s, f: setattr(w, 'alive', False))
    c0 = time.process_time(); signal.setitimer(signal.ITIMER_REAL, secs); w._loop()
    return w.requests / (time.process_time() - c0)

def bare(secs=1.0):
    import signal
    w = Spin(); w.alive = True; run = w.run; n = 0
    signal.signal(signal.SIGALRM, lambda s, f: setattr(w, 'alive', False))
    c0 = time.process_time(); signal.setitimer(signal.ITIMER_REAL, secs)
    while w.alive:
        if run(): n += 1
    return n / (time.process_time() - c0)

lim = dict(timeout=30, soft_memory_limit=1000, hard_memory_limit=2000)
for i in range(3):
    b = bare()
    c, cl = measure(Spin, {}), measure(Spin, lim)
    o, ol = measure(Opt, {}), measure(Opt, lim)
    print('%s bare %.2fM/s | core %.2fM/s (%.2f, +%.0f ns) limits %.2fM/s (%.2f, +%.0f ns) | hoisted %.2fM/s (%.2f, +%.0f ns) limits %.2fM/s (%.2f, +%.0f ns)' % (
        ph.platform.python_implementation(), b/1e6, c/1e6, c/b, 1e9/c-1e9/b, cl/1e6, cl/b, 1e9/cl-1e9/b,
        o/1e6, o/b, 1e9/o-1e9/b, ol/1e6, ol/b, 1e9/ol-1e9/b))
