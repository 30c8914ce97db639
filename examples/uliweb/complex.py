"""uliweb's "complex example", ported: per-worker limits on one Manager.

    python3 examples/uliweb/complex.py      # Ctrl-C (or TERM) to stop

Two different workers, each with its own limits:
- slot 1, a plain Worker: recycled after 2 requests (max_requests=2);
- slot 2, NewWorker: recycled after 2 requests, a run() longer than 5 s is
  killed (its stack is logged first), and memory limits in MB of RSS:
  above soft_memory_limit it exits gracefully, above hard_memory_limit it is
  killed.  uliweb's figures (5 and 10 MB) were for Python 2; an idle
  CPython 3 worker is already ~10-20 MB and a PyPy one ~120 MB (its JIT and
  GC arenas), so the limits here are uliweb's own defaults (200/300 MB).
  Set NEWWORKER_GROW=1 to make run() keep its list and grow past them.

check_point=1: the Manager checks memory every second.
"""
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', '..'))
from processhandler import *  # noqa: E402,F403  (as uliweb's example)

logging.basicConfig(level=logging.INFO)


class NewWorker(Worker):  # noqa: F405
    def init(self):
        self.log = make_log(self.log, 'new_worker.log')  # noqa: F405
        super(NewWorker, self).init()
        self.keep = []

    def run(self):
        s = []
        for i in range(50000):
            s.append(str(i))
        if os.environ.get('NEWWORKER_GROW'):
            self.keep.append(s)          # leak on purpose: hits the limits
        self.log.info('result= %d ' % len(s))
        time.sleep(1)
        return True


if __name__ == '__main__':
    workers = [Worker(max_requests=2),  # noqa: F405
               NewWorker(max_requests=2, timeout=5, name='NewWorker',
                         soft_memory_limit=200, hard_memory_limit=300)]
    manager = Manager(workers, check_point=1)  # noqa: F405
    sys.exit(manager.start())
