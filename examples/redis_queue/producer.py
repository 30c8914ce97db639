"""Push N jobs onto the queue:  python3 producer.py N [redis_url] [queue]"""
import sys

import redis


def main(argv):
    n = int(argv[1]) if len(argv) > 1 else 100
    url = argv[2] if len(argv) > 2 else 'redis://127.0.0.1:6379/0'
    queue = argv[3] if len(argv) > 3 else 'jobs'
    r = redis.Redis.from_url(url)
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.lpush(queue, 'job-%d' % i)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    print('pushed %d jobs onto %s' % (n, queue))


if __name__ == '__main__':
    main(sys.argv)
