"""A reliable Redis job queue worker: nothing is lost when a worker dies.

    redis-server &                                   # 127.0.0.1:6379
    python3 producer.py 1000                         # push 1000 jobs
    python3 ../../processhandler.py -c config.ini    # drain them

Each worker moves a job atomically from the shared list `queue` into a
processing list of its own slot (`queue:processing:<slot>`) with BLMOVE, does
the job, and only then removes it from the processing list.  A worker killed
in the middle leaves the job in its slot's list; the replacement, which gets
the same slot, finishes that list first.  Delivery is at-least-once: a job
can run twice (killed after doing it, before removing it), so jobs should be
idempotent; this example counts executions per job in the hash
`queue:done` so duplicates can be seen.
"""
import time

import processhandler

try:
    # At import time: the master imports this module before it forks, so
    # every worker (and every replacement) starts with redis loaded and
    # boots in milliseconds.
    import redis
except ImportError:     # said clearly by init(), as a boot failure
    redis = None


class QueueWorker(processhandler.Worker):

    def init(self):
        if redis is None:
            raise RuntimeError('the redis package is missing: pip install '
                               'redis')
        self.redis = redis.Redis.from_url(
            self.cfg.get('redis_url', 'redis://127.0.0.1:6379/0'))
        self.queue = self.cfg.get('queue', 'jobs')
        self.processing = '%s:processing:%d' % (self.queue, self.slot)
        self.done = self.queue + ':done'
        self.work_time = float(self.cfg.get('work_time', '0'))
        self.block = float(self.cfg.get('block', '1'))
        left = self.redis.llen(self.processing)
        if left:
            self.log.info('recovering %d job(s) left in %s', left,
                          self.processing)
        # Look at our processing list until it is empty: after that only
        # our own BLMOVE fills it, and each job leaves it when done.
        self.recovering = True

    def next_job(self):
        # Our own processing list first: a predecessor's unfinished job
        # (or ours, after an error).
        if self.recovering:
            job = self.redis.lindex(self.processing, -1)
            if job is not None:
                return job
            self.recovering = False
        return self.redis.blmove(self.queue, self.processing, self.block,
                                 'RIGHT', 'LEFT')

    def run(self):
        job = self.next_job()
        if job is None:
            return False          # nothing to do (BLMOVE timed out)
        try:
            self.process(job)
            # Done: count it, then take it off our processing list,
            # atomically.
            pipe = self.redis.pipeline(transaction=True)
            pipe.hincrby(self.done, job, 1)
            pipe.lrem(self.processing, -1, job)
            pipe.execute()
        except BaseException:
            self.recovering = True  # the job stays on our list: retry it
            raise
        return True

    def process(self, job):
        if self.work_time:
            time.sleep(self.work_time)
