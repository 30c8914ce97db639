"""A pytest plugin of .ci/test: the tests marked slow (the soaks and the
bench smoke run, 20-60 s each) are scheduled first.  In file order they
came last, and the run ended with one worker busy on them while the
others were idle (measured: ~30 s of a 4-minute run)."""

import os

# .ci/test puts this folder on PYTHONPATH so that pytest and its xdist
# workers can import this plugin.  The processes the tests start (CLI,
# masters, workers) must see the environment a user has: a worker drops
# the entry before any test runs.
if os.environ.get('PYTEST_XDIST_WORKER'):
    _here = os.path.dirname(os.path.abspath(__file__))
    _rest = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep)
             if p and os.path.abspath(p) != _here]
    if _rest:
        os.environ['PYTHONPATH'] = os.pathsep.join(_rest)
    else:
        os.environ.pop('PYTHONPATH', None)


def pytest_collection_modifyitems(config, items):
    """Slow tests at the even places of the front, one other test after
    each: xdist's load scheduler (--maxschedchunk 1) hands each worker two
    tests to begin with, so each slow test starts at once on a worker of
    its own.  The order within each group is the file's."""
    slow = [item for item in items if item.get_closest_marker('slow')]
    rest = [item for item in items if not item.get_closest_marker('slow')]
    front = []
    for item in slow:
        front.append(item)
        if rest:
            front.append(rest.pop(0))
    items[:] = front + rest
