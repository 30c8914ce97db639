"""The ProcessHandler seed's job worker, ported: one job per handle_request().

Run it:  python3 ../../processhandler.py -c config.ini   (see README.md)
"""
import time

import processhandler


class JobExecute(processhandler.SyncWorker):
    """Each handle_request() call is one job; the loop counts it."""

    def setup(self):
        self.log.info('worker %d ready (pid %d)', self.slot, self.pid)

    def handle_request(self):
        self.log.info('go... job %d', self.requests + 1)
        time.sleep(1.5)
