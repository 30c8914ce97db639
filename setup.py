"""Installs the single module processhandler.py and its console script.

    pip install .                  # the module + `processhandler` command
    pip install '.[all]'           # with every optional extra
"""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name):
    with open(os.path.join(HERE, name), encoding='utf-8') as f:
        return f.read()


VERSION = re.search(r"^__version__ = '([^']+)'", read('processhandler.py'),
                    re.M).group(1)
EXTRAS = {
    'psutil': ['psutil'],              # memory and affinity (CPython)
    'setproctitle': ['setproctitle'],  # process titles via the C extension
    'gevent': ['gevent'],              # worker_type = gevent
    'redis': ['redis'],                # leader_lock = redis://...
    'msgpack': ['msgpack'],            # the msgpack-RPC example
}
EXTRAS['all'] = sorted(set(sum(EXTRAS.values(), [])))

setup(
    name='processhandler',
    version=VERSION,
    description='A master/worker (prefork) process manager in one file',
    long_description=read('README.md'),
    long_description_content_type='text/markdown',
    license='MIT',
    py_modules=['processhandler'],
    python_requires='>=3.9',
    extras_require=EXTRAS,
    entry_points={'console_scripts': [
        'processhandler = processhandler:_main']},
    classifiers=[
        'License :: OSI Approved :: MIT License',
        'Operating System :: POSIX :: Linux',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: Implementation :: CPython',
        'Programming Language :: Python :: Implementation :: PyPy',
    ],
)
