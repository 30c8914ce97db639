"""A reliable Redis job queue worker: nothing is lost when a worker dies.

    redis-server &                                   # 127.0.0.1:6379
    python3 producer.py 1000                         # push 1000 jobs
    python3 ../../processhandler.py -c config.ini    # drain them

Each worker moves a job atomically from the shared list `queue` into a
processing list of its own slot (`queue:processing:<slot>`) with BLMOVE, does
the job, and only then removes it from the processing list.  A worker killed
in the middle leaves the job in its slot's list; the replacement, which gets
the same slot, finishes that list first.

A slot can also go away for good while its worker is dead (TTOU, a HUP to a
smaller `number_workers`, a crash-looping slot in backoff): then nobody would
come back for its list.  So each worker keeps an ownership key
`queue:owner:<slot>` alive (a TTL of `owner_ttl` seconds, renewed every
third of it), and every worker sweeps now and then: a processing list whose
owner key has expired is pushed back onto `queue`, atomically (one Lua
script), for anyone to take.  `owner_ttl` must be longer than the longest
job, or a slow job's list is swept while it runs and the job runs twice.

Delivery is at-least-once: a job can run twice (killed after doing it,
before removing it), so jobs should be idempotent; this example counts
executions per job in the hash `queue:done` so duplicates can be seen.
"""
import os
import time

import processhandler

try:
    # At import time: the master imports this module before it forks, so
    # every worker (and every replacement) starts with redis loaded and
    # boots in milliseconds.
    import redis
except ImportError:     # said clearly by init(), as a boot failure
    redis = None


# KEYS: processing list, its owner key, the queue.  Atomic, so a worker that
# takes the slot (and sets the owner key) either finds its list already
# emptied or keeps it whole: a job is never in two lists.
SWEEP = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[3], 'RIGHT', 'RIGHT') do
    n = n + 1
end
return n
"""


class QueueWorker(processhandler.Worker):

    def init(self):
        if redis is None:
            raise RuntimeError('the redis package is missing: pip install '
                               'redis')
        self.redis = redis.Redis.from_url(
            self.cfg.get('redis_url', 'redis://127.0.0.1:6379/0'))
        self.queue = self.cfg.get('queue', 'jobs')
        self.processing = '%s:processing:%d' % (self.queue, self.slot)
        self.owner_prefix = self.queue + ':owner:'
        self.owner = self.owner_prefix + str(self.slot)
        self.done = self.queue + ':done'
        self.work_time = float(self.cfg.get('work_time', '0'))
        self.owner_ttl = float(self.cfg.get('owner_ttl', '10'))
        # Renew the owner key every third of its TTL; never block longer
        # than that, or the key could expire while we wait for a job.
        self.renew_every = self.owner_ttl / 3.0
        self.block = min(float(self.cfg.get('block', '1')), self.renew_every)
        self.sweep = self.redis.register_script(SWEEP)
        self.renewed = 0.0
        self.swept = time.monotonic() - self.owner_ttl * self.slot / 8.0
        self.renew()         # before looking at the list: it is ours now
        left = self.redis.llen(self.processing)
        if left:
            self.log.info('recovering %d job(s) left in %s', left,
                          self.processing)
        # Look at our processing list until it is empty: after that only
        # our own BLMOVE fills it, and each job leaves it when done.
        self.recovering = True

    def renew(self):
        self.redis.set(self.owner, self.pid,
                       px=int(self.owner_ttl * 1000))
        self.renewed = time.monotonic()

    def sweep_abandoned(self):
        """Push back the lists of slots nobody owns any more."""
        for key in self.redis.scan_iter(self.queue + ':processing:*'):
            key = key.decode()
            if key == self.processing:
                continue
            owner = self.owner_prefix + key.rsplit(':', 1)[1]
            moved = self.sweep(keys=[key, owner, self.queue])
            if moved:
                self.log.warning('%d abandoned job(s) in %s pushed back onto '
                                 '%s', moved, key, self.queue)

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
        now = time.monotonic()
        if now - self.renewed >= self.renew_every:
            self.renew()
        if now - self.swept >= self.owner_ttl:
            self.swept = now
            self.sweep_abandoned()
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
