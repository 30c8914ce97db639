"""uliweb's basic Workers example, on processhandler's Manager.

    python3 examples/uliweb/basic.py        # Ctrl-C (or TERM) to stop

One worker process runs MyWork.run() in a loop; the Manager (the master)
keeps it alive.  Only the import line differs from uliweb's example.
"""
import os
import sys
import time

# processhandler.py is two folders up in this repository; in a project of
# yours it sits beside your code and this line is not needed.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', '..'))
from processhandler import Worker, Manager  # noqa: E402


class MyWork(Worker):
    def run(self):
        self.log.info('running')
        time.sleep(1)
        return True


if __name__ == '__main__':
    workers = [MyWork()]
    manager = Manager(workers)
    sys.exit(manager.start())
