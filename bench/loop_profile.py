"""python3 bench/loop_profile.py [ROUNDS]: the sync loop's own cost, in one
process, without the harness: Worker._loop (no limits; timeout + memory
limits) against the bare ``while w.alive: if run(): n += 1`` loop, each
round 0.15 s of CPU time per variant, interleaved.  Prints the best round of
each (the least disturbed by other load on the machine) and the ratios.

A quick check while changing _loop; bench/run.py's "loop" rows are the
figures that go to RESULTS.md."""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import processhandler as ph  # noqa: E402


class Spin(ph.Worker):
    def run(self):
        return True


def stop_after(w, secs):
    signal.signal(signal.SIGALRM, lambda s, f: setattr(w, 'alive', False))
    signal.setitimer(signal.ITIMER_REAL, secs)


def core(extra, secs):
    w = Spin()
    board = ph.Scoreboard(16)
    r, wfd = os.pipe()
    w._boot(ph.Config(dict(extra)), 1, board, board.alloc(), wfd,
            os.getppid(), [], None, True)
    c0 = time.process_time()
    stop_after(w, secs)
    w._loop()
    rate = w.requests / (time.process_time() - c0)
    os.close(r)
    os.close(wfd)
    return rate


def bare(secs):
    w = Spin()
    run, n = w.run, 0
    c0 = time.process_time()
    stop_after(w, secs)
    while w.alive:
        if run():
            n += 1
    return n / (time.process_time() - c0)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    limits = dict(timeout=30, soft_memory_limit=1000, hard_memory_limit=2000)
    best = {'bare': 0.0, 'loop': 0.0, 'limits': 0.0}
    for _ in range(rounds):
        best['bare'] = max(best['bare'], bare(0.15))
        best['loop'] = max(best['loop'], core({}, 0.15))
        best['limits'] = max(best['limits'], core(limits, 0.15))
    b = best['bare']
    print('%s %s, best of %d rounds:' % (
        ph.platform.python_implementation(), sys.version.split()[0], rounds))
    for k in ('bare', 'loop', 'limits'):
        v = best[k]
        print('  %-7s %8.2f M runs/s  %6.1f ns/run  ratio %.2f' % (
            k, v / 1e6, 1e9 / v, v / b))


if __name__ == '__main__':
    main()
