#!/usr/bin/env python3
"""processhandler -- a master/worker (prefork) process manager in one file.

Copy this file into a project, subclass ``Worker`` and run::

    python processhandler.py -c config.ini            # foreground master
    python processhandler.py -c config.ini -d         # daemon
    python processhandler.py -c config.ini status     # ask the running master

One master process forks N workers, keeps N alive, recycles them on limits,
reloads them without dropping capacity and never leaves a zombie or an orphan.
Standard library only at import time; psutil, setproctitle, gevent, redis and
msgpack are used when importable.

Map of this file (one line per ``# Banner ####`` section, in order)::

    Compat and capability probes   what this interpreter/OS can do, probed once
    Errors and exit codes          ConfigError, HaltServer, EXIT_* constants,
                                   say/complain; how this process was started
                                   (master_exec_argv, for re-exec)
    Config                         one table (SETTINGS) -> parsing, validation,
                                   "did you mean", --set, check, README table;
                                   save_number_workers (start --save)
    Logging                        one os.write() per record, O_APPEND, reopen
    Process utilities              titles, privileges, memory (RSS), CPU
                                   affinity, children and orphans
    Pid file, instances, daemon    PidFile (POSIX lock), instance numbers,
                                   daemonize and the launcher's report
    Sockets and systemd            listeners (bind, reuse_port, socket
                                   activation), sd_notify, watchdog
    Leader lock                    FileLeader / RedisLeader, and Leadership:
                                   active/standby, renew, fence, step down
    Scoreboard                     shared mmap: per-worker heartbeat and counts
    Workers                        Worker -> SyncWorker / ThreadWorker /
                                   GeventWorker / AsyncioWorker; the loop
                                   classes and WORKER_TYPES (name -> loop)
    Loading worker code            load_worker_class, checks in a child
    Arbiter                        the master and its collaborators (below)
    Manager (uliweb style)         uliweb-style programmatic front end
    Compatibility with the seeds   ProcessHandler's imports and Arbiter,
                                   uliweb's Worker/Manager semantics
                                   (processhandler.uliweb)
    Control client                 one request to a master's control socket
    CLI                            start / stop / status / reload / incr /
                                   decr / check ..., main()

Class diagram::

        Worker  (init / run / after_run; the sync loop)
          |-- SyncWorker      handle_request() style (ProcessHandler seed)
          |-- UliwebWorker    uliweb's Worker (count, is_exit, Timeout)
          |-- ThreadWorker    `threads` run loops in threads
          |-- GeventWorker    `threads` run loops in greenlets
          '-- AsyncioWorker   `threads` tasks of ``async def run``
        SyncLoop -> ThreadLoop -> GeventLoop, SyncLoop -> AsyncioLoop
                              how a worker process runs; WORKER_TYPES
        Arbiter (master loop) --forks--> one worker process per slot
          |                   --forks--> one spare, which becomes the
          |                              next slot's worker when needed
          |   signals -> handle_<name>; each turn: reap -> murder ->
          |   manage (spawn / stop / kill); it conducts, they own state:
          |-- WorkerBirth     the child side of a fork (-> the Worker)
          |-- Spare           the pre-forked spare
          |-- Reload          HUP as a transaction (rollback), its outcome
          |-- ReloadCheck     a HUP's check of the code, in a child
          |-- Upgrade         USR2: preflight child, exec (UpgradeState)
          |-- Leadership      leader lock: active / standby
          |-- ControlServer   the control socket (CLI requests)
          |-- Metrics         counters, /metrics, statsd, health
          |-- MemoryWatch     workers' RSS against their limits
          '-- Watchdog        systemd's WATCHDOG=1
        Manager(workers) --builds--> Arbiter
          '-- UliwebManager   daemon=False: master forked, join() waits

The supported API is what ``__all__`` lists (and the documented
attributes and hooks of Worker); every other name may change.

Design notes live in README.md ("Design").
"""

# Copyright (c) 2026 the processhandler authors.
# MIT License: permission is hereby granted, free of charge, to any person
# obtaining a copy of this file, to deal in it without restriction, including
# the rights to use, copy, modify, merge, publish, distribute, sublicense
# and/or sell copies, provided this notice is kept.  THE SOFTWARE IS PROVIDED
# "AS IS", WITHOUT WARRANTY OF ANY KIND.

from __future__ import print_function

import argparse
import configparser
import difflib
import errno
import fcntl
import gc
import importlib
import json
import logging
import mmap
import os
import random
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import traceback

__version__ = '0.1.0'
__license__ = 'MIT'
__all__ = ['Worker', 'SyncWorker', 'ThreadWorker', 'GeventWorker',
           'AsyncioWorker', 'Arbiter', 'Manager', 'Config', 'ConfigError',
           'HaltServer', 'load_config', 'make_log', 'main', 'WORKER_TYPES',
           'SETTINGS', '__version__', 'UliwebWorker', 'UliwebManager',
           'Timeout', 'TimeoutException', 'get_memory', 'setup_file_logging',
           'install_processhandler_aliases', 'write_compat_shim',
           'RequestInterrupted']


###############################################################################
# Compat and capability probes ################################################
###############################################################################

IS_PYPY = sys.implementation.name == 'pypy'
IS_LINUX = sys.platform.startswith('linux')

try:  # optional: memory and affinity; psutil 7 does not import on PyPy 7.3
    import psutil
except Exception:  # ImportError, or a broken C extension on PyPy
    psutil = None

try:  # optional: process titles (we have a C-free fallback below)
    import setproctitle as _setproctitle
except Exception:
    _setproctitle = None

try:  # SHA-1 without hashlib, whose OpenSSL binding takes ~90 ms to import
    from _sha1 import sha1 as _sha1     # on PyPy: more than the rest of a
except ImportError:                     # CLI call's imports together
    from hashlib import sha1 as _sha1

HAS_SCHED_SETAFFINITY = hasattr(os, 'sched_setaffinity')
PAGE_SIZE = mmap.PAGESIZE

# prctl(2) options used here (linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

_libc_cache = []
_peercred_cache = []


def peercred_option():
    """SO_PEERCRED, or None where a unix socket's peer cannot be asked.

    PyPy 3.9's socket module does not name it (the control socket's uid
    check would then let anyone in): on Linux its value (17; 21 on POWER)
    is probed once on a socketpair, which must report ourselves."""
    if not _peercred_cache:
        opt = getattr(socket, 'SO_PEERCRED', None)
        if opt is None and IS_LINUX:
            opt = next((n for n in (17, 21) if _peercred_works(n)), None)
        _peercred_cache.append(opt)
    return _peercred_cache[0]


def _peercred_works(opt):
    try:
        a, b = socket.socketpair()
    except OSError:
        return False
    try:
        raw = a.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize('3i'))
        return struct.unpack('3i', raw) == (os.getpid(), os.geteuid(),
                                            os.getegid())
    except (OSError, struct.error):
        return False
    finally:
        a.close()
        b.close()


def libc():
    """The C library through ctypes, or None (loaded once, lazily)."""
    if not _libc_cache:
        try:
            import ctypes
            # The running program's symbols include libc's (glibc, musl);
            # ctypes.util.find_library would run ldconfig for the name.
            lib = ctypes.CDLL(None, use_errno=True)
        except Exception:
            lib = None
        _libc_cache.append(lib)
    return _libc_cache[0]


def prctl(option, arg):
    """Call prctl(2); return True on success, False where it cannot work."""
    if not IS_LINUX:
        return False
    lib = libc()
    if lib is None:
        return False
    try:
        return lib.prctl(option, arg, 0, 0, 0) == 0
    except Exception:
        return False


def settle_memory():
    """Hand back what start-up left behind, once, before the first fork.

    Every fork copies the master's page tables and every worker exit
    unmaps them: measured here, fork + exit + wait costs ~0.08 ms more per
    MB of master RSS.  Compiling a module without a usable .pyc leaves a
    ~6 MB peak in malloc's heap that malloc_trim() returns (imported
    master, e.g. the console script: RssAnon 17 -> 11 MB).  gc.freeze()
    moves what exists now out of the collector's reach, so a worker's
    collections do not touch (and copy) the master's objects.
    """
    if IS_PYPY:
        # Its GC grows its arenas back to where they were (measured: a
        # trimmed PyPy master regains 2.5 MB over 10,000 recycles), and
        # it has no gc.freeze: nothing to gain.
        return
    gc.collect()
    if hasattr(gc, 'freeze'):
        gc.freeze()
    lib = libc() if IS_LINUX else None
    trim = getattr(lib, 'malloc_trim', None)
    if trim is not None:
        try:
            trim(0)
        except Exception:
            pass


###############################################################################
# Errors and exit codes #######################################################
###############################################################################

EXIT_OK = 0
EXIT_FAILURE = 1          # could not start / did not stop in time
EXIT_USAGE = 2            # usage or config error
EXIT_NOT_RUNNING = 3      # LSB: program is not running
EXIT_NO_PERMISSION = 4    # LSB: user had insufficient privilege

# Exit statuses of worker processes, read by the master when it reaps them.
WORKER_EXIT_OK = 0
WORKER_EXIT_BOOT_ERROR = 3   # init() raised: a boot failure, back off
WORKER_EXIT_ORPHANED = 4     # the master went away
WORKER_EXIT_FINISHED = 5     # uliweb's is_exit = 'quit': done, no restart


# How a USR2 upgrade hands its state to the re-executed master.
UPGRADE_ENV = 'PROCESSHANDLER_UPGRADE'
# Set for the preflight child of a USR2 (see Upgrade, upgrade_preflight).
PREFLIGHT_ENV = 'PROCESSHANDLER_PREFLIGHT'
# Where and how this process was started, for the USR2 re-exec.
_START = {'cwd': os.getcwd(), 'argv': list(sys.argv)}


def interpreter_flags():
    """This interpreter's -X, -O, -W... options, to start the same one.
    (A private helper of subprocess, stable since 3.3; multiprocessing
    uses it the same way.)"""
    try:
        import subprocess
        return subprocess._args_from_interpreter_flags()
    except Exception:
        return []


def isolated_path():
    """True under -I or -P: `python -I script` keeps the script's folder
    off sys.path, which the lean form would have to put there to import
    this module (and a folder writable by a worker's user must not be)."""
    return bool(sys.flags.isolated or getattr(sys.flags, 'safe_path', 0))


def master_exec_argv(argv=None):
    """The argv that re-executes this master (the lean start, and USR2):
    the same interpreter and flags, and nothing on sys.path ahead of the
    standard library that the original command did not have (no current
    directory).  ``argv``: the master's sys.argv (default: as started).

    When argv[0] is this module, on CPython: the lean form (an import of
    the module, see _main()); otherwise (PyPy, a user's script, a console
    script) the script itself, which puts only its own folder first, as
    the original command did."""
    argv = list(_START['argv'] if argv is None else argv)
    script = os.path.abspath(os.path.join(_START['cwd'], argv[0]))
    cmd = [sys.executable] + interpreter_flags()
    this = os.path.abspath(__file__)
    if this.endswith(('.pyc', '.pyo')):
        this = this[:-1]
    if (IS_PYPY or isolated_path() or
            os.environ.get('PROCESSHANDLER_NO_LEAN') or
            os.path.realpath(script) != os.path.realpath(this)):
        return cmd + [script] + argv[1:]
    return cmd + ['-c', LEAN_START, script] + argv[1:]


class ConfigError(Exception):
    """A problem with the configuration or command line: exit 2, one line."""


class HaltServer(BaseException):
    """Raised inside the master to stop it with a reason and exit status.

    A BaseException so that no ``except Exception`` in between swallows it.
    """

    def __init__(self, reason, exit_status=EXIT_FAILURE):
        BaseException.__init__(self, reason)
        self.reason = reason
        self.exit_status = exit_status


class StdoutFailed(Exception):
    """Standard output cannot be written (a full disk): main() says so in
    one line and exits 1."""

    def __init__(self, error):
        Exception.__init__(self, error)
        self.error = error


def out(text):
    """Write ``text`` to standard output now (flushed, so a failure is
    seen here, inside main(), and not at interpreter exit).  False when the
    reader went away (`status | head -1`): it had what it wanted, so the
    command goes on and ends with its own status, as `git log | head`
    does, its further output discarded (a loop like --watch stops)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
        return True
    except BrokenPipeError:  # a socket's EPIPE never gets here: stdout only
        discard_stdout()
        return False
    except OSError as e:
        raise StdoutFailed(e)


def discard_stdout(stream=None):
    """fd 1 (or ``stream``'s) becomes /dev/null: what is still buffered,
    and what follows, goes nowhere (the exit's flush would fail again, and
    the interpreter would turn the exit status into 120)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, (stream or sys.stdout).fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


def ensure_stdio():
    """Open /dev/null on any of fds 0-2 found closed (`cmd >&-`).  Else
    the next file or pipe opened takes that number, and what is written
    "to stdout" lands in it (daemonize's pipe to the launcher would become
    fd 1, then be replaced by /dev/null: the start fails).  Python made
    the missing streams None at start-up: they get real objects again."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(1, 'w', closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, 'w', buffering=1, closefd=False,
                          errors='backslashreplace')


def stdout_failed(error):
    """The end of a command whose output cannot be written."""
    discard_stdout()
    complain('cannot write to standard output: %s'
             % (error.strerror or error))
    return EXIT_FAILURE


# C0/C1 controls and DEL, lone surrogates (unencodable), bidi overrides.
_UNPRINTABLE = ((0, 0x20), (0x7f, 0xa0), (0xd800, 0xe000),
                (0x202a, 0x202f), (0x2066, 0x206a))
_ESCAPES = {'\t': '\\t', '\n': '\\n', '\r': '\\r'}


def printable(text):
    """``text`` safe for the operator's terminal: control characters (an
    escape sequence, a newline forging a line) in what a worker or its
    exception said are shown escaped, the way repr() shows them."""
    text = str(text)
    if text.isprintable():    # the usual case: nothing to escape
        return text
    return ''.join(_escaped(c) for c in text)


def _escaped(c):
    n = ord(c)
    if not any(lo <= n < hi for lo, hi in _UNPRINTABLE):
        return c
    return _ESCAPES.get(c) or ('\\x%02x' if n < 0x100 else '\\u%04x') % n


def say(msg):
    out('processhandler: %s\n' % printable(msg))


def say_done(msg):
    """say() for a command whose exit status is its outcome (start -d,
    stop): the daemon runs (or is gone) whether or not the line can be
    written, so a stdout that fails loses the line, not the exit 0 (a
    script seeing 1 would retry a start, and fail as "already running")."""
    try:
        say(msg)
    except StdoutFailed:
        discard_stdout()


def complain(msg):
    """One line on stderr.  Never raises: a stderr that cannot be written
    (a full disk, closed) loses the line and the command still ends with
    its own exit status; it then goes to /dev/null (see discard_stdout)."""
    err = sys.stderr
    if err is None:      # print(file=None) would write to stdout
        return
    try:
        print('processhandler: %s' % printable(msg), file=err)
        err.flush()
    except (OSError, ValueError):   # ValueError: a closed stream
        discard_stdout(err)


###############################################################################
# Config ######################################################################
###############################################################################

def _parse_bool(value):
    v = value.strip().lower()
    if v in configparser.ConfigParser.BOOLEAN_STATES:
        return configparser.ConfigParser.BOOLEAN_STATES[v]
    raise ValueError('expected true or false, got %r' % value)


def _number(kind, minimum=None, maximum=None):
    def parse(value):
        try:
            n = kind(value.strip())
        except (ValueError, OverflowError):
            raise ValueError('expected %s, got %r' % (
                'a whole number' if kind is int else 'a number', value))
        if n != n or n in (float('inf'), float('-inf')):
            raise ValueError('expected a finite number, got %r' % value)
        if minimum is not None and n < minimum:
            raise ValueError('must be at least %s, got %r' % (minimum, value))
        if maximum is not None and n > maximum:
            raise ValueError('must be at most %s, got %r' % (maximum, value))
        return n
    return parse


def _choice(*choices):
    def parse(value):
        v = value.strip().lower()
        if v not in choices:
            raise ValueError('expected one of %s, got %r'
                             % (', '.join(choices), value))
        return v
    return parse


def _worker_type(value):
    # One table of worker types: WORKER_TYPES (Workers section), read
    # when a config is parsed, after the module is loaded.
    return _choice(*WORKER_TYPES)(value)


def _string(value):
    # A NUL byte cannot reach the OS (paths, titles, user names): say so
    # here rather than as a ValueError traceback later.
    if '\0' in value:
        raise ValueError('contains a NUL byte: %r' % value)
    return value.strip()


def _optional_path(value):
    # Made absolute by Config: base_path against the config file's folder,
    # pidfile and log_file against base_path.
    value = _string(value)
    return os.path.expanduser(value) if value else None


def _worker_class(value):
    value = value.strip()
    if value.count(':') != 1 or not all(value.split(':')):
        raise ValueError("expected 'module:Class', got %r" % value)
    return value


def _umask(value):
    try:
        n = int(value.strip(), 8)
    except ValueError:
        raise ValueError('expected an octal mask such as 022, got %r' % value)
    if not 0 <= n <= 0o777:
        raise ValueError('expected an octal mask between 000 and 777')
    return n


def _log_level(value):
    v = value.strip().upper()
    if v not in ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'):
        raise ValueError('expected debug, info, warning, error or critical, '
                         'got %r' % value)
    return v


def parse_cpu_list(value):
    """'0,2-3' -> [0, 2, 3]; raise ValueError on anything else."""
    cpus = []
    for part in value.split(','):
        part = part.strip()
        lo, sep, hi = part.partition('-')
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError('expected true, false or a CPU list like '
                             '0,2-3, got %r' % value)
        lo = int(lo)
        hi = int(hi) if sep else lo
        if hi < lo or hi > 4095:
            raise ValueError('bad CPU range %r' % part)
        cpus.extend(range(lo, hi + 1))
    return cpus


def _cpu_affinity(value):
    v = value.strip().lower()
    # '0' is the CPU list [0] (every slot on CPU 0), not "off".
    if v in ('', 'off', 'false', 'no'):
        return None
    if v in ('true', 'on', 'yes'):
        return True
    return parse_cpu_list(v)


def parse_address(addr):
    """'host:port', '[::1]:port' or 'unix:/path' -> (family, address)."""
    addr = addr.strip()
    if addr.startswith('unix:'):
        path = addr[5:]
        if not path:
            raise ValueError('unix: needs a path')
        return socket.AF_UNIX, os.path.abspath(path)
    if addr.startswith('['):
        host, sep, port = addr[1:].partition(']:')
        family = socket.AF_INET6
    else:
        host, sep, port = addr.rpartition(':')
        family = socket.AF_INET
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected host:port, [v6]:port or unix:/path, "
                         "got %r" % addr)
    return family, (host or '0.0.0.0', int(port))


def _bind(value):
    return [a.strip() for a in value.split(',') if a.strip()
            and parse_address(a) is not None]


def _host_port(value):
    """'host:port' (statsd_host, metrics_bind) or None when empty."""
    v = _string(value)
    if not v:
        return None
    if v.startswith('unix:'):
        raise ValueError('expected host:port, got %r' % value)
    parse_address(v)
    return v


def _leader_lock(value):
    v = value.strip()
    if v and not (v.startswith('redis://') or v.startswith('file:')):
        raise ValueError("expected redis://host:port/db?key=NAME or "
                         "file:/path, got %r" % value)
    return v or None


class Setting(object):
    """One row of the config table."""
    __slots__ = ('name', 'parse', 'default', 'doc')

    def __init__(self, name, parse, default, doc):
        self.name, self.parse, self.default, self.doc = (
            name, parse, default, doc)


# The one config table: (key, parser, default, doc).  Validation, "did you
# mean", --set, `check` and the README's table all come from here.  A default
# of None means "unset"; defaults that depend on other keys are filled in by
# Config.__init__ (proc_name, base_path).
# The scoreboard has a cell per worker process (4096): a reload runs two
# generations side by side, plus the spare, so at most this many workers.
MAX_WORKERS = 2000

SETTINGS = [Setting(*row) for row in [
    ('worker_class', _worker_class, None,
     "'module:Class' of the worker; required from a config file"),
    ('number_workers', _number(int, 1, MAX_WORKERS), 1,
     'workers kept alive'),
    ('worker_type', _worker_type, 'sync',
     'sync, thread, gevent (greenlets) or asyncio'),
    ('threads', _number(int, 1, 100000), 1,
     'concurrent run loops per worker for thread/gevent/asyncio'),
    ('max_requests', _number(int, 0), 0,
     'recycle a worker after this many handled requests (0: never)'),
    ('max_requests_jitter', _number(int, 0), 0,
     'each worker adds its own random 0..J to max_requests'),
    ('timeout', _number(float, 0), 0.0,
     'a run() call longer than this is dumped (stack) and killed (0: none)'),
    ('graceful_timeout', _number(float, 0), 3.0,
     'seconds a worker has to finish after TERM before KILL'),
    ('boot_timeout', _number(float, 0), None,
     "seconds a worker's start (import, __init__, init()) may take before "
     'it is killed as a boot failure (default: 60, or timeout when larger; '
     '0: none)'),
    ('soft_memory_limit', _number(float, 0), 0.0,
     'RSS MB above which a worker is asked to exit gracefully (0: none)'),
    ('hard_memory_limit', _number(float, 0), 0.0,
     'RSS MB above which a worker is killed (0: none)'),
    ('interval', _number(float, 0), 0.0,
     'seconds a worker waits between run() calls'),
    ('spare_worker', _parse_bool, True,
     'keep one pre-forked process waiting to replace a worker (no fork '
     'between a death and the replacement)'),
    ('check_interval', _number(float, 0.01), 1.0,
     'how often the master checks memory limits'),
    ('daemonize', _parse_bool, False, 'detach from the terminal'),
    ('proc_name', _string, None, 'process title prefix (default: section)'),
    ('pidfile', _optional_path, None, 'pid file, removed on exit'),
    ('single_instance', _parse_bool, True,
     'refuse a second master (false: numbered further instances)'),
    ('base_path', _optional_path, None,
     "working directory and import path (default: config file's folder)"),
    ('log_path', _string, None, 'a folder, available for interpolation'),
    ('log_file', _optional_path, None,
     'log file (default: stderr; - for stdout)'),
    ('log_level', _log_level, 'INFO', 'debug, info, warning, error'),
    ('log_format', _choice('text', 'json'), 'text',
     'text, or json: one JSON object per line (time, level, role, slot, '
     'pid, message, exception)'),
    ('user', _string, None, 'drop to this user (as root)'),
    ('group', _string, None, 'drop to this group (as root)'),
    ('umask', _umask, 0o022, 'umask of the master and workers (octal)'),
    ('cpu_affinity', _cpu_affinity, None,
     'true: slot i on the i-th allowed CPU; or a list such as 0,2-3'),
    ('bind', _bind, [], 'host:port, [::1]:port or unix:/path, comma separated'),
    ('reuse_port', _parse_bool, False, 'one SO_REUSEPORT listener per worker'),
    ('accept_lock', _parse_bool, False, 'serialise accept() across workers'),
    ('leader_lock', _leader_lock, None,
     'redis://host:port/db?key=NAME or file:/path: active/standby'),
    ('leader_ttl', _number(float, 0.5), 10.0,
     "seconds a leader's lock lives without renewal"),
    ('metrics_bind', _host_port, None,
     'host:port where the master serves Prometheus metrics (GET /metrics)'),
    ('statsd_host', _host_port, None,
     'host:port of a statsd server: metrics over UDP, as gunicorn sends'),
    ('statsd_prefix', _string, None,
     'prefix of the statsd metric names, such as service.app'),
]]
SETTINGS_BY_NAME = dict((s.name, s) for s in SETTINGS)

# Keys that a HUP cannot change in a running master: say so instead of
# pretending.  (A USR2 upgrade or a restart applies them.)
def settings_table():
    """The README's config table, in Markdown, from SETTINGS."""
    def show(s):
        d = s.default
        if s.name == 'umask':
            return '`022`'
        if d is None or d == []:
            return '-'
        if isinstance(d, bool):
            return '`%s`' % str(d).lower()
        return '`%s`' % (str(d).lower() if s.name == 'log_level' else d)
    rows = ['| key | default | meaning |', '|---|---|---|']
    rows += ['| `%s` | %s | %s |' % (s.name, show(s), s.doc) for s in SETTINGS]
    return '\n'.join(rows)


RESTART_ONLY = ('pidfile', 'single_instance', 'daemonize', 'bind',
                'reuse_port', 'user', 'group', 'leader_lock', 'base_path',
                'metrics_bind', 'statsd_host', 'statsd_prefix',
                'accept_lock', 'leader_ttl')


def boot_timeout_of(cfg):
    """The boot timeout in effect: the setting, else 60 s or ``timeout``
    when larger (a worker whose runs may take long may boot slowly too).
    0: none."""
    if cfg.boot_timeout is not None:
        return cfg.boot_timeout
    return max(60.0, cfg.timeout or 0.0)


def did_you_mean(word, choices):
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return close[0] if close else None


class Config(object):
    """Typed settings of one section, plus its unknown keys as strings.

    ``cfg.timeout`` and ``cfg['timeout']`` give the typed value; a key that
    is not in SETTINGS (a queue name, say) is a string: ``cfg['queue']``,
    ``cfg.get('queue', 'default')``.
    """

    def __init__(self, values=None, extras=None, path=None, section=None,
                 overrides=(), sources=None):
        self.path = path
        self.section = section or 'processhandler'
        self.overrides = list(overrides)
        # key -> where its value came from ('file', '--set', ...), for
        # `check --print`; a key missing here has its default.
        self.sources = dict(sources or {})
        self.extras = dict(extras or {})
        values = values or {}
        for s in SETTINGS:
            v = values.get(s.name, s.default)
            setattr(self, s.name, list(v) if isinstance(v, list) else v)
        if not self.proc_name:     # unset or `proc_name =`: the section
            self.proc_name = self.section
        here = (os.path.dirname(os.path.abspath(path)) if path else
                os.getcwd())
        self.base_path = os.path.normpath(os.path.join(
            here, self.base_path or ''))
        for key in ('pidfile', 'log_file'):
            if getattr(self, key) and getattr(self, key) != '-':
                setattr(self, key, os.path.normpath(os.path.join(
                    self.base_path, getattr(self, key))))
        if self.log_path is None:
            self.log_path = self.base_path

    def validate(self, where='', problems=None):
        """Cross-key checks; raise ConfigError, or append each problem to
        ``problems`` when a list is given (`check` reports them all)."""
        soft, hard = self.soft_memory_limit, self.hard_memory_limit
        if soft and hard and hard <= soft:
            report(problems, '%shard_memory_limit: must exceed '
                   'soft_memory_limit (%g <= %g)' % (where, hard, soft))

    def __getitem__(self, key):
        if key in SETTINGS_BY_NAME:
            return getattr(self, key)
        return self.extras[key]

    def __getattr__(self, key):
        # Only reached for names that are not attributes: the extras.  A
        # missing key reads as None, as ProcessHandler's config did
        # (cfg['key'] raises KeyError instead).
        if key.startswith('_'):
            raise AttributeError(key)
        return self.__dict__.get('extras', {}).get(key)

    def __contains__(self, key):
        return key in SETTINGS_BY_NAME or key in self.extras

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def items(self):
        d = dict((s.name, getattr(self, s.name)) for s in SETTINGS)
        d.update(self.extras)
        return d.items()

    def unknown_keys(self):
        """[(key, suggestion or None)] for keys not in the table."""
        names = list(SETTINGS_BY_NAME)
        return [(k, did_you_mean(k, names)) for k in sorted(self.extras)]

    def where(self, key=None):
        return '%s [%s]%s' % (self.path or '<api>', self.section,
                              ' %s:' % key if key else ':')


def report(problems, msg):
    """Raise ConfigError(msg), or collect it when ``problems`` is a list."""
    if problems is None:
        raise ConfigError(msg)
    problems.append(msg)


def parse_overrides(pairs, where='--set'):
    """['key=value', ...] -> [(key, value)]; ConfigError on a bad pair."""
    out = []
    for pair in pairs or ():
        key, sep, value = pair.partition('=')
        if not sep or not key.strip():
            raise ConfigError('%s %r: expected KEY=VALUE' % (where, pair))
        out.append((key.strip(), value))
    return out


# Extra --set values from the environment (like GUNICORN_CMD_ARGS), and the
# default for -c: what a container's environment can say.
ENV_SET = 'PROCESSHANDLER_SET'
ENV_CONFIG = 'PROCESSHANDLER_CONFIG'


def env_overrides():
    """PROCESSHANDLER_SET="k=v k2='a b'" -> ['k=v', 'k2=a b'] (shlex)."""
    import shlex
    try:
        return shlex.split(os.environ.get(ENV_SET, ''), comments=True)
    except ValueError as e:
        raise ConfigError('%s: %s' % (ENV_SET, e))


class EnvInterpolation(configparser.BasicInterpolation):
    """``%(name)s`` as usual, plus ``%(ENV_NAME)s``: the environment
    variable NAME (supervisor's convention).  Names are looked up
    case-insensitively (configparser lower-cases option names)."""

    def before_get(self, parser, section, option, value, defaults):
        if '%(' in value:
            env = dict(('env_' + k.lower(), v.replace('%', '%%'))
                       for k, v in os.environ.items())
            env.update(defaults)
            defaults = env
        return configparser.BasicInterpolation.before_get(
            self, parser, section, option, value, defaults)


def new_parser(defaults=None):
    # Inline comments (';' or '#' after whitespace) are comments, as INI
    # users expect: `queue = jobs  ; the queue` gives 'jobs'.
    return configparser.ConfigParser(
        defaults=defaults, interpolation=EnvInterpolation(),
        inline_comment_prefixes=(';', '#'))


def read_parser(path):
    """(parser with base_path/log_path defaults, parser of the file alone)
    for ``path``; ConfigError with one line."""
    here = os.path.dirname(path)
    # base_path and log_path defaults are visible to %(...)s interpolation.
    parser = new_parser({'base_path': here, 'log_path': '%(base_path)s'})
    plain = new_parser()      # tells a key of the file from a default
    try:
        text = read_config_text(path)
        parser.read_string(text, path)
        plain.read_string(text, path)
    except (OSError, IOError) as e:
        raise ConfigError('%s: cannot read config file: %s'
                          % (path, e.strerror or e))
    except UnicodeDecodeError:
        raise ConfigError('%s: not a text file (invalid UTF-8)' % path)
    except configparser.Error as e:
        raise ConfigError('%s: %s' % (path, str(e).splitlines()[0]))
    return parser, plain


def read_config_text(path):
    """The text of config file ``path``.  Opened O_NONBLOCK and checked
    with fstat first: a FIFO (or a device) would block the reader -- a
    `check`, a start, a HUP in the master -- for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK |
                 getattr(os, 'O_CLOEXEC', 0))
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ConfigError('%s: the config file is %s, not a regular file'
                          % (path, file_kind(mode)))
    with open(fd, encoding='utf-8', newline=None) as f:
        return f.read()


def pick_section(parser, section, path):
    sections = parser.sections()
    if section is None:
        if len(sections) == 1:
            return sections[0]
        if not sections:
            raise ConfigError('%s: no section found (add one such as '
                              '[myjob])' % path)
        raise ConfigError('%s: several sections (%s): choose one with -s'
                          % (path, ', '.join(sections)))
    if not parser.has_section(section):
        hint = did_you_mean(section, sections)
        raise ConfigError('%s: no section [%s]%s (sections: %s)' % (
            path, section, "; did you mean '%s'?" % hint if hint else '',
            ', '.join(sections) or 'none'))
    return section


def value_source(plain, section, key):
    """'file', or 'environment ($NAME, via the file)' for a file value
    that interpolates one; None for a default."""
    if not plain.has_option(section, key):
        return None
    raw = plain.get(section, key, raw=True)
    names = [w.split(')')[0][4:].upper() for w in raw.split('%(')[1:]
             if w.lower().startswith('env_')]
    if names:
        return 'environment (%s, via the file)' % ', '.join(
            '$' + n for n in names)
    return 'file'


def interpolation_error(where, key, e):
    ref = getattr(e, 'reference', '') or ''
    if (isinstance(e, configparser.InterpolationMissingOptionError) and
            ref.startswith('env_')):
        return '%s %s: environment variable %s is not set' % (
            where, key, ref[4:].upper())
    return '%s %s: %s' % (where, key, ' '.join(str(e).split()))


def set_overrides(parser, section, from_env, overrides):
    """Put PROCESSHANDLER_SET's and then --set's KEY=VALUE pairs into
    ``parser``'s ``section``; return {key: where its value comes from}."""
    sources = {}
    for pairs, origin in ((from_env, 'environment (%s)' % ENV_SET),
                          (overrides, '--set')):
        for key, value in pairs:
            try:
                parser.set(section, key, value)
            except (ValueError, configparser.Error) as e:
                raise ConfigError('%s %s: %s' % (
                    '--set' if origin == '--set' else ENV_SET, key, e))
            sources[parser.optionxform(key)] = origin
    return sources


def load_config(path, section=None, overrides=(), problems=None,
                from_env=()):
    """Read ``path`` and return the Config of ``section``.

    ``from_env``: KEY=VALUE pairs from PROCESSHANDLER_SET, applied before
    ``overrides`` (--set).  Raises ConfigError with one line naming the
    file, section, key and what is wrong; with a ``problems`` list, a bad
    value is appended there instead (the key keeps its default) so that
    `check` can report every problem at once.
    """
    from_env = parse_overrides(from_env, ENV_SET)
    overrides = parse_overrides(overrides)
    path = os.path.abspath(path)
    parser, plain = read_parser(path)
    section = pick_section(parser, section, path)
    where = '%s [%s]' % (path, section)
    sources = set_overrides(parser, section, from_env, overrides)
    values, extras = {}, {}
    for key in parser.options(section):
        try:
            raw = parser.get(section, key)
        except configparser.InterpolationError as e:
            report(problems, interpolation_error(where, key, e))
            continue
        if key not in sources:
            sources[key] = value_source(plain, section, key)
        if key in SETTINGS_BY_NAME:
            setting = SETTINGS_BY_NAME[key]
            if setting.default is None and not raw.strip():
                continue   # `pidfile =`: unset, as `check --print` shows it
            try:
                values[key] = setting.parse(raw)
            except ValueError as e:
                if sources[key] is None and problems:
                    continue   # a default made of a bad value (log_path)
                report(problems, '%s %s: %s' % (where, key, e))
                sources[key] = '%s: INVALID, default shown' % sources[key]
        else:
            extras[key] = raw
    cfg = Config(values, extras, path=path, section=section,
                 overrides=from_env + overrides,
                 sources=dict((k, v) for k, v in sources.items() if v))
    cfg.validate(where + ' ', problems)
    return cfg


def inline_comment(value):
    """' 2   ; two' -> '   ; two': the inline comment of a value, with the
    blanks before it (configparser's rule: ';' or '#' after whitespace)."""
    marks = [i for i in range(1, len(value))
             if value[i] in ';#' and value[i - 1] in ' \t']
    if not marks:
        return ''
    start = marks[0]
    while start > 0 and value[start - 1] in ' \t':
        start -= 1
    return value[start:]


def save_number_workers(path, section, n):
    """Rewrite ``number_workers`` of ``section`` in place, atomically.

    Every other byte of the file stays as it was (comments, order, blank
    lines, line endings); mode and owner are kept; temp file + rename.
    A symlinked config is edited at its target (the link stays a link).
    """
    # Renaming over the link would replace the link by a regular file and
    # leave the file it points to unchanged.
    path = os.path.realpath(path)
    with open(path, encoding='utf-8', newline='') as f:
        lines = f.read().splitlines(True)
    out, in_section, done, insert_at = [], False, False, None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith('[') and stripped.endswith(']'):
            if in_section and insert_at is None:
                insert_at = len(out)
            in_section = stripped[1:-1].strip() == section
            if in_section:
                insert_at = None
        elif in_section and not done:
            key, sep, _ = line.partition('=')
            if not sep:
                key, sep, _ = line.partition(':')
            if sep and key.strip().lower() == 'number_workers':
                eol = line[len(line.rstrip('\r\n')):] or '\n'
                line = '%s%s %d%s%s' % (key, sep, n, inline_comment(
                    line[len(key) + len(sep):].rstrip('\r\n')), eol)
                done = True
        out.append(line)
    if not done:
        eol = '\r\n' if lines and lines[0].endswith('\r\n') else '\n'
        if insert_at is None:
            insert_at = len(out)
            if out and not out[-1].endswith(('\n', '\r')):
                out[-1] += eol
        # Put it right after the section's last non-blank line.
        while insert_at > 0 and not out[insert_at - 1].strip():
            insert_at -= 1
        out.insert(insert_at, 'number_workers = %d%s' % (n, eol))
    replace_file(path, ''.join(out))


def replace_file(path, text, mode=None):
    """Write ``text`` over ``path`` atomically (temp file + rename).
    Without ``mode``: keep the existing file's mode and owner, refuse a
    read-only file.  With ``mode``: a new file of ours whatever is at the
    path (a symlink planted there is replaced, its target never read or
    written)."""
    st = None
    if mode is None:
        st = os.stat(path)
        if not os.access(path, os.W_OK) or not st.st_mode & 0o222:
            # The rename below would replace a read-only file: respect it,
            # also as root (access() says yes to root; the mode bits no).
            raise OSError(errno.EACCES, 'the file is read-only')
        mode = stat.S_IMODE(st.st_mode)
    fd, tmp = exclusive_temp(path)
    try:
        with os.fdopen(fd, 'w', encoding='utf-8', newline='') as f:
            f.write(text)
            f.flush()
            # Through the descriptor, never the temp file's path: whoever
            # can write the folder could swap a symlink in there and get
            # root's chown/chmod applied to any file (REVIEW 2).
            os.fchmod(f.fileno(), mode)
            if st is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def exclusive_temp(path):
    """(fd, name) of a new file beside ``path``, created O_EXCL|O_NOFOLLOW
    mode 0600: never an existing file or a planted symlink's target."""
    folder, base = os.path.split(path)
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL |
             getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_CLOEXEC', 0))
    for _ in range(100):
        tmp = os.path.join(folder, '.%s.%s' % (base, os.urandom(6).hex()))
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, 'no free temporary name beside %s' % path)


###############################################################################
# Logging #####################################################################
###############################################################################

# "master" or "worker 3": the process tag put into every record.  Each
# process sets its own after fork.
_process_tag = ['master']

# A USR1 (reopen logs) that reached a new worker before it had its own
# handler: replayed by Worker._init_signals.
_USR1_DEFERRED = [False]


def _defer_usr1(signum, frame):
    _USR1_DEFERRED[0] = True


def fork_deferring_usr1():
    """os.fork() for a worker, USR1 blocked across it: in the child it
    stays pending until prepare() has installed _defer_usr1 (a USR1 sent
    just after the fork would otherwise meet the master's handler, which
    only records it, and the worker would keep the rotated log)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        raise
    if pid:     # the mask as found (USR2's exec blocks signals on purpose)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return pid


class LineFormatter(logging.Formatter):
    """One line per record; continuation lines (tracebacks, multi-line
    messages) are prefixed with '  | ' so they cannot pass for records."""

    def __init__(self, proc_name='processhandler'):
        logging.Formatter.__init__(self)
        self.proc_name = proc_name

    def format(self, record):
        t = time.localtime(record.created)
        head = '%s.%03d [%d] [%s] %s %s: ' % (
            time.strftime('%Y-%m-%d %H:%M:%S', t), record.msecs,
            record.process or os.getpid(), record.levelname, self.proc_name,
            _process_tag[0])
        text = record.getMessage()
        if record.exc_info:
            text += '\n' + ''.join(
                traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            text += '\n' + record.exc_text
        if record.stack_info:
            text += '\n' + record.stack_info
        return head + text.replace('\n', '\n  | ')


class JsonFormatter(logging.Formatter):
    """``log_format = json``: one JSON object per line, for log shippers.

    Keys: time (ISO 8601, local, with offset), level, role (master, worker,
    spare), slot (or null), pid, name (proc_name), logger, message,
    exception (the formatted traceback, or null).  json.dumps escapes
    newlines, so a traceback stays inside its one line.
    """

    def __init__(self, proc_name='processhandler'):
        logging.Formatter.__init__(self)
        self.proc_name = proc_name

    def format(self, record):
        t = time.localtime(record.created)
        stamp = time.strftime('%Y-%m-%dT%H:%M:%S', t) + '.%03d%s' % (
            record.msecs, time.strftime('%z', t))
        role, _, slot = _process_tag[0].partition(' ')
        exc = None
        if record.exc_info:
            exc = ''.join(traceback.format_exception(*record.exc_info))
        elif record.exc_text:
            exc = record.exc_text
        doc = {'time': stamp, 'level': record.levelname, 'role': role,
               'slot': int(slot) if slot.isdigit() else None,
               'pid': record.process or os.getpid(), 'name': self.proc_name,
               'logger': record.name, 'message': record.getMessage(),
               'exception': exc.rstrip() if exc else None}
        if record.stack_info:
            doc['stack'] = record.stack_info
        return json.dumps(doc, ensure_ascii=False, default=str)


def make_formatter(cfg):
    if getattr(cfg, 'log_format', 'text') == 'json':
        return JsonFormatter(cfg.proc_name)
    return LineFormatter(cfg.proc_name)


def file_kind(mode):
    """'a FIFO', 'a socket'... for the type bits of ``mode``."""
    for test, name in ((stat.S_ISFIFO, 'a FIFO (named pipe)'),
                       (stat.S_ISSOCK, 'a socket'),
                       (stat.S_ISDIR, 'a directory'),
                       (stat.S_ISBLK, 'a block device'),
                       (stat.S_ISCHR, 'a character device'),
                       (stat.S_ISREG, 'a regular file')):
        if test(mode):
            return name
    return 'not a regular file'


def check_log_target(path):
    """Refuse a ``log_file`` that is neither a regular file nor a character
    device (/dev/null, /dev/full, a tty); raise ConfigError.

    Opening a FIFO for writing blocks until a reader comes (a start that
    hangs for ever), a socket or a directory cannot be opened, a block
    device would be overwritten.  A missing file is fine: it is created.
    Only stat() here: the check itself must never block.
    """
    if not path:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError('log_file %s: %s' % (path, e.strerror or e))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        raise ConfigError('log_file %s is %s: it must be a regular file or '
                          'a character device such as /dev/null'
                          % (path, file_kind(st.st_mode)))


def log_owner(cfg):
    """(uid, gid) the workers drop to, who must be able to reopen the log
    (see LogFile), or None."""
    uid, gid = resolve_user_group(cfg.user, cfg.group)
    return (uid, gid) if uid is not None else None


class LogFile(object):
    """The log target of this process: stderr or a file opened O_APPEND.

    Every record is written with a single os.write() on an O_APPEND file
    descriptor, so records from many processes never interleave mid-line (the
    kernel serialises appends) and nothing sits in a user-space buffer at
    fork or at rotation.  ``reopen()`` opens the path again and dup2()s it
    onto the same descriptor numbers (USR1, logrotate).
    """

    def __init__(self, path=None, redirect_stdio=False, owner=None):
        self.path = path
        self.redirect_stdio = redirect_stdio
        self.owner = owner   # (uid, gid) the workers drop to, or None
        self.fd = 2
        self.failed = False
        # Write failures (a full disk), for `status`: the log itself is the
        # one place where nobody will read about them.  In shared memory:
        # the workers, forked after this, count theirs into the same cells
        # [count, errno, time] (an increment lost to a race is harmless).
        self.failures = memoryview(mmap.mmap(-1, 24)).cast('d')
        if path == '-':        # log_file = -: stdout (containers)
            self.fd = 1
        elif path:
            self.fd = self._open()
            if redirect_stdio:
                self._stdio_to(self.fd)

    def _open(self):
        """A new descriptor of the log file.  O_NONBLOCK: a FIFO put in
        its place (by the workers' user, in their log folder) must never
        block the master in open(); it is refused after fstat.  Given to
        ``owner`` only when this call created it: a pre-existing file
        (a hard link to root's 0600 file) is never chowned."""
        flags = (os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK |
                 getattr(os, 'O_CLOEXEC', 0) | getattr(os, 'O_NOFOLLOW', 0))
        created = True
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            created = False
            fd = open_existing_log(self.path, flags)
        try:
            st = os.fstat(fd)
            problem = log_file_problem(st, self.owner)
            if problem:
                raise OSError(errno.EPERM, problem)
            # Blocking writes again (a tty, or a full pipe of a terminal).
            fcntl.fcntl(fd, fcntl.F_SETFL,
                        fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            uid, gid = self.owner or (None, None)
            if (created and uid is not None and os.geteuid() == 0 and
                    st.st_uid != uid):
                # Workers that dropped to `user` reopen it on USR1 (after
                # logrotate the master creates the new file first).
                os.fchown(fd, uid, -1 if gid is None else gid)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _stdio_to(self, fd):
        for std in (1, 2):
            if fd != std:
                os.dup2(fd, std)

    def reopen(self):
        if not self.path or self.path == '-':
            return
        fd = self._open()
        try:
            os.dup2(fd, self.fd, inheritable=False)
            if self.redirect_stdio:
                self._stdio_to(fd)
        finally:
            os.close(fd)
        self.failed = False

    def write(self, data):
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except OSError as e:
            f = self.failures
            f[0], f[1], f[2] = f[0] + 1, e.errno or 0, time.time()
            if not self.failed:
                # Say it once, where someone may see it, then carry on: a
                # full disk must not crash the master or a worker.
                self.failed = True
                msg = ('processhandler[%d]: cannot write to log %s: %s '
                       '(further log errors are not reported until reopen)\n'
                       % (os.getpid(), self.path or 'stderr', e.strerror))
                for fd in (2, 1):
                    if fd != self.fd:
                        try:
                            os.write(fd, msg.encode())
                            break
                        except OSError:
                            pass

    def write_errors(self):
        """{'write_errors': N, 'last_error': text, 'last_error_at': time}
        over this process and its children."""
        n, code, when = self.failures
        return {'write_errors': int(n),
                'last_error': os.strerror(int(code)) if n else None,
                'last_error_at': when or None}

    def close(self):
        if self.path and self.path != '-' and self.fd > 2:
            try:
                os.close(self.fd)
            except OSError:
                pass


def open_existing_log(path, flags):
    """Open an existing log file with ``flags`` (O_NONBLOCK among them);
    a FIFO without a reader (ENXIO) is said as such."""
    try:
        return os.open(path, flags)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
        raise OSError(errno.ENXIO, 'it is a FIFO: it must be a regular '
                      'file or a character device such as /dev/null')


def log_file_problem(st, owner=None):
    """Why an opened log file must not be written to, or None.

    Like the pidfile: a file owned by another user (an attacker's 0666 file
    in /tmp) must not receive root's records and the daemon's stdio.  Its
    owner must be root, this process's user, or the workers' ``user``
    (``owner``: (uid, gid) or None; the master gives the file to them).
    The one place for the log file's checks."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        return ('is %s: it must be a regular file or a character device '
                'such as /dev/null' % file_kind(st.st_mode))
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        # A hard link to another file (root's 0600 secrets): our records
        # and the daemon's stdio would go there.
        return ('has %d hard links: refusing a file that is also another '
                'file' % st.st_nlink)
    allowed = set([0, os.geteuid()])
    if owner and owner[0] is not None:
        allowed.add(owner[0])
    if st.st_uid not in allowed:
        return ('owned by uid %d, not by root, this process (uid %d) or '
                'the workers\' user: refusing to write to it'
                % (st.st_uid, os.geteuid()))
    return None


class LogFileHandler(logging.Handler):
    """logging.Handler writing one os.write() per record to a LogFile."""

    def __init__(self, logfile, formatter):
        logging.Handler.__init__(self)
        self.logfile = logfile
        self.setFormatter(formatter)

    def emit(self, record):
        try:
            line = self.format(record) + '\n'
            self.logfile.write(line.encode('utf-8', 'backslashreplace'))
        except Exception:
            self.handleError(record)

    def createLock(self):
        # One os.write per record is atomic enough; a lock here is the one
        # that deadlocks when a signal handler or a fork lands inside it.
        self.lock = None

    def acquire(self):
        pass

    def release(self):
        pass


log = logging.getLogger('processhandler')


def setup_logging(cfg, logfile):
    """Route the root logger (user code included) to ``logfile``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, LogFileHandler):
            root.removeHandler(h)
    root.addHandler(LogFileHandler(logfile, make_formatter(cfg)))
    root.setLevel(getattr(logging, cfg.log_level))
    log.setLevel(logging.NOTSET)


###############################################################################
# Process utilities ###########################################################
###############################################################################

# -- titles -------------------------------------------------------------------

class _ArgvArea(object):
    """The original argv memory of this process, to rewrite in place.

    /proc/self/stat fields 48/49 (arg_start, arg_end) give its bounds; a
    title written there (padded with NULs, never longer than the original)
    is what ps(1) shows.  No C extension needed: ctypes.memmove, which PyPy
    has too.  /proc/PID/environ is left alone (gunicorn #2321).
    """
    bounds = None

    @classmethod
    def probe(cls):
        if cls.bounds is None:
            cls.bounds = ()
            try:
                with open('/proc/self/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
                start, end = int(fields[45]), int(fields[46])
                if 0 < start < end:
                    cls.bounds = (start, end)
            except (OSError, IndexError, ValueError):
                pass
        return cls.bounds

    @classmethod
    def write(cls, title):
        bounds = cls.probe()
        if not bounds:
            return False
        import ctypes
        start, end = bounds
        size = end - start
        data = title.encode('utf-8', 'replace')[:size - 1]
        try:
            ctypes.memmove(start, data + b'\0' * (size - len(data)), size)
        except Exception:
            return False
        return True


def set_proc_title(title):
    """Set what ps shows (args) and /proc/PID/comm (first 15 bytes)."""
    bounds = _ArgvArea.probe() if IS_LINUX else ()
    if _setproctitle is not None:
        limit = (bounds[1] - bounds[0] - 1) if bounds else len(title)
        _setproctitle.setproctitle(title[:max(limit, 1)])
    elif not _ArgvArea.write(title):
        pass  # no way on this platform; comm below still helps
    set_comm(title)


def set_comm(name):
    data = name.encode('utf-8', 'replace')[:15]
    if prctl(PR_SET_NAME, data):
        return
    try:
        with open('/proc/self/comm', 'wb') as f:
            f.write(data)
    except OSError:
        pass


# -- privileges, parent death, subreaper --------------------------------------

def resolve_user_group(user, group):
    """Names or numbers -> (uid or None, gid or None); ConfigError if unknown.
    """
    import grp
    import pwd
    uid = gid = None
    if user:
        try:
            pw = (pwd.getpwuid(int(user)) if user.isdigit() else
                  pwd.getpwnam(user))
        except (KeyError, ValueError):
            raise ConfigError('user: no such user %r' % user)
        uid, gid = pw.pw_uid, pw.pw_gid
    if group:
        try:
            gid = (grp.getgrgid(int(group)).gr_gid if group.isdigit() else
                   grp.getgrnam(group).gr_gid)
        except (KeyError, ValueError):
            raise ConfigError('group: no such group %r' % group)
    return uid, gid


def drop_privileges(uid, gid):
    if os.getuid() != 0:
        return
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


# -- memory --------------------------------------------------------------------

def rss_mb(pid):
    """Current resident set size of ``pid`` in MB, or None if it is gone.

    Current, not peak: a peak-based limit recycles a fresh worker after
    every task (celery #4125).
    """
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss / 1048576.0
        except psutil.NoSuchProcess:
            return None
        except Exception:
            pass   # fall through to /proc
    try:
        # Field 2 of statm is resident pages: the stdlib path (PyPy).
        with open('/proc/%d/statm' % pid, 'rb') as f:
            return int(f.read().split()[1]) * PAGE_SIZE / 1048576.0
    except (OSError, IndexError, ValueError):
        return None


# -- CPU affinity ----------------------------------------------------------------

def get_affinity():
    """CPUs this process may run on (sorted list)."""
    if HAS_SCHED_SETAFFINITY:
        return sorted(os.sched_getaffinity(0))
    if psutil is not None:
        try:
            return sorted(psutil.Process().cpu_affinity())
        except Exception:
            pass
    mask = _ctypes_affinity(None)
    return mask if mask else list(range(os.cpu_count() or 1))


def set_affinity(cpus):
    """Pin this process to ``cpus``; True when done."""
    if HAS_SCHED_SETAFFINITY:
        os.sched_setaffinity(0, cpus)
        return True
    if psutil is not None:
        try:
            psutil.Process().cpu_affinity(list(cpus))
            return True
        except Exception:
            pass
    return _ctypes_affinity(cpus) is not None


def _ctypes_affinity(cpus):
    """sched_{get,set}affinity(2) through ctypes (PyPy 3.9 lacks os.sched_*).

    With ``cpus`` None, read the mask; otherwise set it.  None on failure.
    """
    lib = libc()
    if lib is None or not IS_LINUX:
        return None
    import ctypes
    nbytes = 128  # 1024 CPUs
    buf = (ctypes.c_ubyte * nbytes)()
    if cpus is None:
        if lib.sched_getaffinity(0, nbytes, buf) != 0:
            return None
        return [i for i in range(nbytes * 8) if buf[i // 8] >> (i % 8) & 1]
    for c in cpus:
        if not 0 <= c < nbytes * 8:
            return None          # beyond the mask: cannot be set
        buf[c // 8] |= 1 << (c % 8)
    if lib.sched_setaffinity(0, nbytes, buf) != 0:
        return None
    return list(cpus)


def affinity_for_slot(setting, slot, allowed):
    """The CPU list for worker ``slot`` given the cpu_affinity setting."""
    pool = allowed if setting is True else list(setting)
    if not pool:
        return None
    return [pool[(slot - 1) % len(pool)]]


# -- children -------------------------------------------------------------------

def child_pids(pid=None):
    """Pids whose parent is ``pid`` (default: this process), from /proc."""
    pid = pid or os.getpid()
    found = set()
    try:
        for tid in os.listdir('/proc/%d/task' % pid):
            try:
                with open('/proc/%d/task/%s/children' % (pid, tid)) as f:
                    found.update(int(p) for p in f.read().split())
            except OSError:
                raise
        return found
    except OSError:
        pass
    # No /proc/PID/task/TID/children (kernel without CONFIG_PROC_CHILDREN).
    for name in os.listdir('/proc') if os.path.isdir('/proc') else ():
        if name.isdigit():
            try:
                with open('/proc/%s/stat' % name) as f:
                    if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                        found.add(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def kill_quietly(pid, sig):
    """os.kill() that ignores a process already gone (its reaper sees it)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_orphans(known, grace):
    """TERM, then KILL after ``grace`` s, the grandchildren that were
    re-parented to us (we are a child subreaper): our children not in
    ``known``; reap them."""
    left = child_pids() - set(known)
    if not left:
        return
    log.info('stopping %d adopted orphan process(es): %s', len(left),
             ' '.join(map(str, sorted(left))))
    for pid in left:
        kill_quietly(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    delay = 0.005
    while left:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            break
        left = child_pids()
        if time.monotonic() > deadline:
            for pid in left:
                kill_quietly(pid, signal.SIGKILL)
            deadline = float('inf')
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


###############################################################################
# Pid file, instances, daemon #################################################
###############################################################################

_FLOCK = struct.Struct('hhqqi4x')  # struct flock on LP64 Linux


def lock_holder(fd):
    """Pid holding a POSIX write lock on ``fd``'s file, or 0 if none.

    F_GETLK names the holder itself: no need to trust the pid written in
    the file (gunicorn #3383: a stale pid reused by another process).
    """
    try:
        res = fcntl.fcntl(fd, fcntl.F_GETLK,
                          _FLOCK.pack(fcntl.F_WRLCK, 0, 0, 0, 0))
        l_type, _, _, _, l_pid = _FLOCK.unpack(res[:_FLOCK.size])
        if l_type != fcntl.F_WRLCK:
            # Anyone who can read the file can take a READ lock on it: that
            # is no master (a write lock and another's read lock exclude
            # each other, so there is none then).
            return 0
        return l_pid or -1
    except (OSError, struct.error):
        # Unknown layout: fall back to a non-blocking attempt.
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return -1
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return 0


def read_locker(fd):
    """Pid of a process holding a READ lock on ``fd``'s file, or 0.

    No master ever holds one (they write-lock), so it is a stranger who
    could open the file (one created readable by others by an older
    version or by hand) and keeps every master from locking it.
    """
    try:
        res = fcntl.fcntl(fd, fcntl.F_GETLK,
                          _FLOCK.pack(fcntl.F_WRLCK, 0, 0, 0, 0))
        l_type, _, _, _, l_pid = _FLOCK.unpack(res[:_FLOCK.size])
    except (OSError, struct.error):
        return 0
    return l_pid if l_type == fcntl.F_RDLCK else 0


def read_lock_refusal(what, path, pid):
    """The one line refusing a lock file a stranger read-locks.

    We do not replace the file to get past the lock: only the holder of
    the write lock may unlink or replace a lock file (see unlock_instance);
    replacing it without that lock could leave two masters each holding a
    lock on a different inode, both active.  A clear refusal is safer, and
    a file of ours is 0600 by now (tighten), so it cannot happen again.
    """
    try:
        uid = ' (uid %d)' % os.stat('/proc/%d' % pid).st_uid
    except OSError:
        uid = ''
    return ('%s %s is read-locked by pid %d%s, which is no master: no '
            'master can lock it while it does; stop that process or remove '
            'the file (once 0600, others cannot open it again)'
            % (what, path, pid, uid))


_SAID_UNTRUSTED = set()


def trusted_owner(uid, pidfile, what):
    """Whether a pidfile, lock file or control socket peer of uid ``uid``
    may be believed: the caller's, root's, those of the owner of the
    pidfile's folder (who controls its entries anyway: a master started
    as that user), or anyone's in a folder others may not write (a run
    folder root:app 0770 of a service user's master, which root's `stop`
    must see).  Anyone else's in a world-writable folder was planted (a
    shared, sticky folder): its lock holder may be any process of theirs,
    a setuid one included, and its socket may say anything.  Said once
    per file on stderr."""
    if uid in (os.geteuid(), 0):
        return True
    try:
        st = os.stat(os.path.dirname(pidfile) or '.')
        if st.st_uid == uid or not st.st_mode & stat.S_IWOTH:
            return True
    except OSError:
        pass
    if (what, pidfile) not in _SAID_UNTRUSTED:
        _SAID_UNTRUSTED.add((what, pidfile))
        complain('ignoring %s of %s: owned by uid %d, not by you, root or '
                 'the owner of its folder (planted by another user?)'
                 % (what, pidfile, uid))
    return False


def running_pid(path):
    """Pid of the master of pidfile ``path``, or 0: the write-lock holder
    of its instance lock file, else (a caller who may not read that 0600
    file, or a master of an older version) of the pidfile itself.  A file
    of an untrusted owner (trusted_owner) names nobody."""
    for name in (instance_lock_path(path), path):
        try:
            fd = os.open(name, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0) |
                         getattr(os, 'O_CLOEXEC', 0))
        except OSError:
            continue
        try:
            # fstat of what we opened: no window to swap the file in.
            what = 'the lock file' if name != path else 'the pidfile'
            ok = trusted_owner(os.fstat(fd).st_uid, path, what)
            holder = lock_holder(fd) if ok else 0
        finally:
            os.close(fd)
        if not ok:
            return 0
        if holder:
            return holder
    return 0


def instance_lock_path(pidfile):
    return pidfile + '.lock'


def foreign_file(st, what, path):
    """Why a lock file we opened (``st``: its fstat) must not be used, or
    None: not a regular file, or owned by another non-root user (a file
    planted there to be locked for ever or to receive our writes)."""
    if not stat.S_ISREG(st.st_mode):
        return '%s %s is %s, not a regular file' % (
            what, path, file_kind(st.st_mode))
    if st.st_uid not in (os.geteuid(), 0):
        return '%s %s is owned by uid %d, not by us' % (what, path,
                                                         st.st_uid)
    return None


class PidFile(object):
    """The pid file and the instance lock.

    The master holds a POSIX (fcntl) write lock for its lifetime on
    ``<pidfile>.lock`` (mode 0600: nobody else may open it, so nobody else
    can hold a read lock that would keep us from locking it) and, for
    readers who may not open that file, on the pidfile (0644) when it can:
    a stranger's read lock there only hides us from them.  The lock, not
    the pid written inside, says who runs.  Both are opened with O_NOFOLLOW
    (a planted symlink is refused), and refused when owned by another
    non-root user.
    """

    def __init__(self, path):
        self.path = path
        self.fd = None
        self.lock_fd = None

    def acquire(self):
        """Lock and write our pid; return 0, or the pid of the holder."""
        holder = self.lock_instance()
        if holder:
            return holder
        try:
            holder = self.lock_pidfile()
        except BaseException:   # a symlinked or foreign pidfile
            self.unlock_instance()
            raise
        if holder:
            self.unlock_instance()
        return holder

    def lock_instance(self):
        """Write-lock ``<pidfile>.lock``; 0, or the holder's pid."""
        path = instance_lock_path(self.path)
        while True:
            fd = open_lock_file(path, 'instance lock', 0o600)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = lock_holder(fd)
                stranger = 0 if holder else read_locker(fd)
                os.close(fd)
                if stranger:
                    raise HaltServer(read_lock_refusal('instance lock',
                                                       path, stranger))
                return holder or -1
            if same_file(fd, path):   # not unlinked by a releasing master
                self.lock_fd = fd
                return 0
            os.close(fd)

    def unlock_instance(self):
        if self.lock_fd is not None:
            unlink_if_same(instance_lock_path(self.path), self.lock_fd)
            os.close(self.lock_fd)   # closing drops the lock
            self.lock_fd = None

    def lock_pidfile(self):
        """Open (and write-lock, when no stranger's read lock is in the
        way) the pidfile; write our pid.  0, or the pid of an older
        version's master holding it."""
        d = os.path.dirname(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT |
                         getattr(os, 'O_NOFOLLOW', 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise HaltServer('pidfile %s is a symbolic link: refusing '
                                 'to follow it' % self.path)
            raise HaltServer('cannot open pidfile %s: %s (directory %s)'
                             % (self.path, e.strerror, d))
        st = os.fstat(fd)
        problem = foreign_file(st, 'pidfile', self.path)
        if problem:
            os.close(fd)
            raise HaltServer(problem)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = lock_holder(fd)
            if holder:        # a master that knows no instance lock file
                os.close(fd)
                return holder
        if st.st_mode & 0o022:
            os.fchmod(fd, 0o644)
        self.fd = fd
        self.write(os.getpid())
        return 0

    def write(self, pid):
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, ('%d\n' % pid).encode(), 0)

    def release(self):
        if self.fd is None:
            return
        unlink_if_same(self.path, self.fd)
        os.close(self.fd)  # closing drops the lock
        self.fd = None
        self.unlock_instance()


def same_file(fd, path):
    """Whether ``path`` (not followed) is still the file open as ``fd``."""
    try:
        st, mine = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def unlink_if_same(path, fd):
    """Remove ``path`` if it is the file open as ``fd`` (not a new one)."""
    if same_file(fd, path):
        try:
            os.unlink(path)
        except OSError:
            pass


def open_lock_file(path, what, mode):
    """An O_RDWR descriptor of lock file ``path`` (created ``mode``); a
    symlink, or a file we must not use (foreign_file), is a HaltServer."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK |
                     getattr(os, 'O_NOFOLLOW', 0) |
                     getattr(os, 'O_CLOEXEC', 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise HaltServer('%s %s is a symbolic link: refusing to follow '
                             'it' % (what, path))
        raise HaltServer('cannot open %s %s: %s (directory %s)' % (
            what, path, e.strerror, os.path.dirname(path)))
    st = os.fstat(fd)
    problem = foreign_file(st, what, path) or tighten(fd, st, what, path,
                                                      mode)
    if problem:
        os.close(fd)
        raise HaltServer(problem)
    return fd


def tighten(fd, st, what, path, mode):
    """Make an existing lock file ``mode`` (0600) when it is broader: a
    file others may open is a file they may read-lock for ever.  Through
    the open descriptor (fchmod), never by path: the path may be swapped
    in between.  Returns why it cannot be used, or None.

    A root-owned file that a non-root master may open but not chmod: fine
    when only a group may read it (shared on purpose), refused when every
    user may (as sshd's StrictModes would): the admin must chmod it.
    """
    if not stat.S_IMODE(st.st_mode) & ~mode:
        return None
    if st.st_uid == os.geteuid():
        os.fchmod(fd, mode)
        return None
    if st.st_mode & 0o006:
        return ('%s %s is owned by uid %d and open to every user (mode '
                '%04o): any of them could lock it; chmod 600 it or remove '
                'it' % (what, path, st.st_uid, stat.S_IMODE(st.st_mode)))
    return None


def runtime_dir():
    """A private (0700, ours, not a symlink) folder for default paths."""
    d = os.path.join(tempfile.gettempdir(), 'processhandler-%d' % os.getuid())
    try:
        os.mkdir(d, 0o700)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
    st = os.lstat(d)
    if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or
            st.st_mode & 0o077):
        raise HaltServer('%s is not a private directory of ours' % d)
    return d


def sha1_hex(text):
    """The hex SHA-1 of ``text``, for names derived from paths."""
    return _sha1(text.encode('utf-8')).hexdigest()


def base_pidfile(cfg):
    """The pidfile of instance 1 (configured, or derived from config+section).
    """
    if cfg.pidfile:
        return cfg.pidfile
    # Manager mode has no config file: the script is what identifies it.
    origin = cfg.path or os.path.abspath(sys.argv[0] or 'python')
    key = '%s\0%s' % (origin, cfg.section)
    digest = sha1_hex(key)[:10]
    return os.path.join(runtime_dir(), '%s-%s.pid' % (cfg.section, digest))


def instance_pidfile(cfg, n):
    base = base_pidfile(cfg)
    return base if n == 1 else '%s.%d' % (base, n)


def control_path(pidfile):
    """The control socket of the master owning ``pidfile``.

    Beside the pidfile when the path fits in sun_path (108 bytes), else in
    the private runtime folder under a hash of the pidfile path.
    """
    path = pidfile + '.sock'
    if len(path.encode()) < 100:
        return path
    digest = sha1_hex(pidfile)[:16]
    return os.path.join(runtime_dir(), digest + '.sock')


def instances(cfg):
    """[(n, pidfile, pid)] of every running instance of this section."""
    base = base_pidfile(cfg)
    found = []
    numbers = [1]
    d, name = os.path.split(base)
    try:
        for entry in os.listdir(d or '.'):
            suffix = entry[len(name) + 1:]
            if entry.startswith(name + '.') and suffix.isdigit():
                numbers.append(int(suffix))
    except OSError:
        pass
    for n in sorted(set(numbers)):
        path = instance_pidfile(cfg, n)
        pid = running_pid(path)
        if pid:
            found.append((n, path, pid))
    return found


def acquire_instance(cfg, upgrade=None):
    """Take the pidfile lock of the first free instance (or refuse):
    return (PidFile, instance number).  After a USR2 exec: the lock
    held already, handed over in ``upgrade`` (UpgradeState)."""
    if upgrade:
        # Same pid, same open lock: POSIX locks survive execve.
        pidfile = PidFile(upgrade.pidfile)
        pidfile.fd = upgrade.lock_fd
        # Inheritable only for the execve: not for anything we run.
        os.set_inheritable(pidfile.fd, False)
        pidfile.lock_fd = upgrade.instance_lock_fd
        if pidfile.lock_fd is not None:
            os.set_inheritable(pidfile.lock_fd, False)
        elif pidfile.lock_instance():   # an older image had none
            log.warning('instance lock %s is held by another process',
                        instance_lock_path(pidfile.path))
        pidfile.write(os.getpid())
        return pidfile, upgrade.instance
    for n in range(1, 1000):
        pidfile = PidFile(instance_pidfile(cfg, n))
        holder = pidfile.acquire()
        if not holder:
            return pidfile, n
        if cfg.single_instance:
            raise HaltServer('already running (pid %s, pidfile %s)'
                             % (holder, pidfile.path))
    raise HaltServer('no free instance number below 1000')


# -- daemonize ------------------------------------------------------------------

def daemonize(cfg):
    """Detach: fork, setsid, fork.  Returns in the daemon only.

    The launching process waits on a pipe for the daemon to report "ready"
    or the reason it failed, prints it and exits 0 or 1 (gunicorn #949: a
    --daemon start must not claim success while nothing runs).  The write
    end, in the daemon, is returned.
    """
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        sys.exit(_daemon_launcher(r, pid, launch_limit(cfg)))
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)          # the session leader goes: no controlling tty
    os.umask(cfg.umask)
    os.chdir(cfg.base_path)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if cfg.log_file in (None, '-'):   # nothing would read stdio anyway
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    os.close(devnull)
    return w


def launch_limit(cfg):
    """How long `start -d` waits for the daemon's word: its workers' boot
    (bounded by boot_timeout) plus a margin for the master's own start."""
    return (boot_timeout_of(cfg) or 60.0) + 30.0


def _daemon_launcher(r, pid, limit):
    """Parent half of daemonize(): report what the daemon says, waiting
    at most ``limit`` seconds."""
    os.waitpid(pid, 0)
    chunks = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            ready, _, _ = select.select([r], [], [],
                                        deadline - time.monotonic())
            data = os.read(r, 4096) if ready else None
        except InterruptedError:
            continue
        if data is None:
            continue
        if not data:
            break
        chunks.append(data)
        if b'\n' in data:
            break
    else:
        os.close(r)
        complain('failed to start: no word from the daemon within %gs (it '
                 'may still be starting; see the log)' % limit)
        return EXIT_FAILURE
    os.close(r)
    # (The reason may be a worker's init() exception: escaped, see say().)
    msg = b''.join(chunks).decode('utf-8', 'replace').strip()
    if msg.startswith('ready'):
        say_done('started, %s' % msg[6:])
        return EXIT_OK
    complain('failed to start: %s' % (
        msg[6:] if msg.startswith('error') else
        'the daemon exited without a word (see the log)'))
    return EXIT_FAILURE


def report_to_launcher(fd, word, text):
    if fd is None:
        return None
    try:
        os.write(fd, ('%s %s\n' % (word, text)).encode('utf-8'))
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass
    return None


###############################################################################
# Sockets and systemd #########################################################
###############################################################################

def create_listener(addr, reuse_port=False, listen=True, owner=None):
    """A listening socket for 'host:port', '[v6]:port' or 'unix:/path'.

    Non-blocking (workers select, then accept; a worker that loses the race
    gets EAGAIN).  ``reuse_port`` sets SO_REUSEPORT; ``listen=False`` only
    binds, which reserves the port without taking connections (the master's
    placeholder when each worker has its own SO_REUSEPORT listener).
    Raises HaltServer with a one-line reason.
    """
    family, address = parse_address(addr)
    try:
        if family == socket.AF_UNIX:
            sock = _unix_listener(address, owner)
        else:
            host, port = address
            infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM,
                                       0, socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
    except (OSError, socket.gaierror) as e:
        raise HaltServer('cannot bind %s: %s' % (
            addr, getattr(e, 'strerror', None) or e))
    if listen:
        sock.listen(min(2048, socket.SOMAXCONN))
    sock.setblocking(False)
    return sock


def _unix_listener(path, owner):
    """Bind a unix socket at ``path`` (mode 0660), replacing a stale one."""
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, '%s exists and is not a socket'
                          % path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise OSError(errno.EADDRINUSE, 'Address already in use')
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)           # nobody listens: stale
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if owner and os.geteuid() == 0:
        uid, gid = owner
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    return sock


def listener_name(sock):
    addr = sock.getsockname()
    if isinstance(addr, str):
        return 'unix:' + addr
    if sock.family == socket.AF_INET6:
        return '[%s]:%d' % addr[:2]
    return '%s:%d' % addr


def systemd_listeners():
    """Sockets passed by systemd socket activation (LISTEN_FDS), or []."""
    if os.environ.get('LISTEN_PID') != str(os.getpid()):
        return []
    try:
        n = int(os.environ.get('LISTEN_FDS', '0'))
    except ValueError:
        n = 0
    socks = []
    for fd in range(3, 3 + n):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        socks.append(sock)
    for key in ('LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES'):
        os.environ.pop(key, None)   # not for our children
    return socks


def open_listeners(cfg, upgrade=None, owner=None):
    """Listeners, opened before any fork and inherited by the workers:
    systemd's (socket activation) if given, else ``bind`` (unix sockets
    chowned to ``owner``); after a USR2 exec, the ones handed over in
    ``upgrade``.  Return (sockets, accept_lock's fd or None)."""
    accept_fd = None
    if upgrade:
        sockets = [socket.socket(fileno=fd) for fd in upgrade.fds]
        for sock in sockets:
            sock.setblocking(False)
            sock.set_inheritable(False)   # see acquire_instance
        if upgrade.accept_fd is not None:
            os.set_inheritable(upgrade.accept_fd, False)
        return sockets, upgrade.accept_fd
    sockets = systemd_listeners()
    if sockets:
        log.info('listening on %s (from systemd)', ', '.join(
            listener_name(s) for s in sockets))
    elif cfg.bind:
        # With reuse_port the master only reserves the addresses (bound,
        # not listening); each worker opens its own listener.
        sockets = [create_listener(a, cfg.reuse_port,
                                   listen=not cfg.reuse_port, owner=owner)
                   for a in cfg.bind]
        log.info('listening on %s%s', ', '.join(
            listener_name(s) for s in sockets),
            ' (SO_REUSEPORT: one listener per worker)'
            if cfg.reuse_port else '')
    if sockets and cfg.accept_lock and not cfg.reuse_port:
        fd, path = tempfile.mkstemp(prefix='processhandler-accept-')
        os.unlink(path)
        accept_fd = fd
    return sockets, accept_fd


def close_inherited_fds():
    """Close every descriptor above 2 that this process inherited (a
    launching shell's `exec 7>file`, a parent's pipes): the daemon and its
    workers must not hold them.  systemd's LISTEN_FDS (3..3+n-1, when
    LISTEN_PID is this process) are kept.  Called first thing in a fresh
    `start`, before this process opens anything of its own."""
    keep = set()
    if os.environ.get('LISTEN_PID') == str(os.getpid()):
        try:
            keep = set(range(3, 3 + int(os.environ.get('LISTEN_FDS', '0'))))
        except ValueError:
            pass
    try:
        fds = [int(n) for n in os.listdir('/proc/self/fd')]
    except OSError:
        return
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass   # the listing's own descriptor, closed already


# -- systemd notify ------------------------------------------------------------

def watchdog_interval():
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or 0."""
    pid = os.environ.get('WATCHDOG_PID')
    if pid and pid != str(os.getpid()):
        return 0.0
    try:
        return int(os.environ.get('WATCHDOG_USEC', '0')) / 2e6
    except ValueError:
        return 0.0


def monotonic_usec():
    """CLOCK_MONOTONIC in microseconds (systemd's MONOTONIC_USEC=)."""
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)


def sd_notify(message):
    """Send ``message`` to systemd's NOTIFY_SOCKET, if there is one."""
    addr = os.environ.get('NOTIFY_SOCKET')
    if not addr:
        return False
    if addr.startswith('@'):
        addr = '\0' + addr[1:]
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.connect(addr)
            s.sendall(message.encode('utf-8'))
        finally:
            s.close()
        return True
    except OSError:
        return False


###############################################################################
# Leader lock #################################################################
###############################################################################

class FileLeader(object):
    """``leader_lock = file:/path``: an fcntl lock held while active.

    The kernel drops it when the holder dies, so there is no lease to
    renew; on a shared filesystem it is only as good as its locking.
    """
    ttl = float('inf')

    def __init__(self, path):
        self.path = path
        self.fd = None
        self.expires = float('inf')
        self.token = '%s:%d' % (socket.gethostname(), os.getpid())

    def describe(self):
        return 'file:%s' % self.path

    def check(self):
        """At start: refuse a lock file we must not use (HaltServer), as
        the pidfile's: otherwise every master stands by for ever."""
        try:
            fd = self.open()
            stranger = read_locker(fd)
            self.discard(fd)
        except LeaderError as e:
            raise HaltServer('leader_lock: %s' % e)
        if stranger:
            raise HaltServer('leader_lock: %s' % read_lock_refusal(
                'lock file', self.path, stranger))

    def open(self):
        # 0600: whoever may open it could hold a read lock on it, and keep
        # every master on standby for ever.
        try:
            return open_lock_file(self.path, 'lock file', 0o600)
        except HaltServer as e:
            raise LeaderError(e.reason)

    def discard(self, fd):
        # Closing any descriptor of the file drops this process's POSIX
        # locks on it: never while we hold the lock.
        if self.fd is None:
            os.close(fd)

    def acquire(self):
        fd = self.open()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            stranger = read_locker(fd)
            os.close(fd)
            if stranger:   # said once by Leadership, not on every poll
                raise LeaderError(read_lock_refusal('lock file', self.path,
                                                    stranger))
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, (self.token + '\n').encode(), 0)
        self.fd = fd
        return True

    def renew(self):
        return self.fd is not None

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return True

    def holder(self):
        if self.fd is not None:
            # Never open+close the file while holding the lock: closing ANY
            # descriptor of a file drops this process's POSIX locks on it.
            return self.token
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except OSError:
            return None
        return text if running_pid(self.path) else None


class LeaderError(Exception):
    """The lock's backend cannot be reached or used (Redis down...)."""


class RedisLeader(object):
    """``leader_lock = redis://host:port/db?key=NAME``: a lease in Redis.

    Acquire: SET key token NX PX ttl.  Renew: compare-and-extend in Lua, so
    a master never extends a lock it lost.  Release: compare-and-delete.
    ``expires`` is the local monotonic time at which the lease may have
    expired, measured from *before* the command was sent (conservative).
    """

    def close_in_child(self):
        """In a forked child: close the master's Redis connections without
        a word to Redis (a shutdown() would end the master's too)."""
        pool = getattr(self.client, 'connection_pool', None)
        conns = (list(getattr(pool, '_available_connections', ())) +
                 list(getattr(pool, '_in_use_connections', ())))
        for conn in conns:
            sock = getattr(conn, '_sock', None)
            if sock is not None:
                try:
                    os.close(sock.detach())
                except OSError:
                    pass
                conn._sock = None

    RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
             "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 "
             "end")
    RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
               "return redis.call('del', KEYS[1]) else return 0 end")

    def __init__(self, url, ttl):
        try:
            import redis
        except ImportError:
            raise ConfigError('leader_lock: %s needs the redis package '
                              '(pip install redis)' % url)
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        self.key = dict(query).get('key') or 'processhandler:leader'
        self.url = urlunsplit(parts._replace(query=urlencode(
            [kv for kv in query if kv[0] != 'key'])))
        self.ttl = ttl
        self.errors = (redis.exceptions.RedisError, OSError)
        # Short socket timeouts: the master's loop waits on these calls.
        t = max(0.1, min(1.0, ttl / 10.0))
        self.client = redis.Redis.from_url(self.url, socket_timeout=t,
                                           socket_connect_timeout=t)
        self.token = '%s:%d:%s' % (socket.gethostname(), os.getpid(),
                                   os.urandom(6).hex())
        self.expires = 0.0

    def describe(self):
        return '%s key %s' % (self.url, self.key)

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except self.errors as e:
            raise LeaderError('redis %s: %s' % (self.url, e))

    def acquire(self):
        t0 = time.monotonic()
        if self._call(self.client.set, self.key, self.token, nx=True,
                      px=int(self.ttl * 1000)):
            self.expires = t0 + self.ttl
            return True
        # The key may hold our own token: a SET of ours that timed out on
        # a hung server still ran when it resumed.  Then it is ours:
        # compare-and-extend it rather than wait a whole TTL for nobody.
        return self.renew()

    def renew(self):
        t0 = time.monotonic()
        if self._call(self.client.eval, self.RENEW, 1, self.key, self.token,
                      int(self.ttl * 1000)) == 1:
            self.expires = t0 + self.ttl
            return True
        return False

    def release(self):
        """Compare-and-delete: True if our key was deleted, False if the
        key holds another token (left alone), None if Redis is unreachable
        (the lease then expires by itself)."""
        try:
            done = self._call(self.client.eval, self.RELEASE, 1, self.key,
                              self.token) == 1
        except LeaderError:
            done = None
        self.expires = 0.0
        return done

    def holder(self):
        try:
            value = self._call(self.client.get, self.key)
        except LeaderError:
            return None
        return value.decode('utf-8', 'replace') if value else None


def make_leader(cfg):
    """The leader lock of ``cfg`` (None when not configured)."""
    if not cfg.leader_lock:
        return None
    if cfg.leader_lock.startswith('file:'):
        return FileLeader(os.path.join(cfg.base_path, cfg.leader_lock[5:]))
    return RedisLeader(cfg.leader_lock, cfg.leader_ttl)


class Leadership(object):
    """Active / standby through the leader lock, owned by the Arbiter.

    A standby polls the lock; an active master renews it and fences
    itself: when it cannot renew in time it stops every worker before
    its lease can expire (step_down), so two masters never run workers
    at once.  ``lock`` is a FileLeader or RedisLeader.
    """

    def __init__(self, arbiter, lock):
        self.arbiter = arbiter
        self.lock = lock
        self.active = False
        self.next_at = 0.0      # next renew (active) or poll (standby)
        self.warned = None      # the last LeaderError logged

    def step_down_at(self):
        """When an active master that could not renew must start stopping
        its workers so that all are dead before its lease can expire:
        expiry - (grace + margin), grace capped at a third of the TTL."""
        ttl = self.lock.ttl
        return (self.lock.expires - self.step_down_grace() -
                min(1.0, ttl / 10.0))

    def step_down_grace(self):
        return min(self.arbiter.cfg.graceful_timeout, self.lock.ttl / 3.0)

    def tended(self):
        """A standby polls until it stops; an active master renews until
        its last worker is gone, a stopping one included: workers slow to
        finish must not outlive the lease while a standby takes over."""
        a = self.arbiter
        return not a.stopping or (self.active and bool(a.procs))

    def deadlines(self):
        """The loop's wake-up times for the lock (next_deadline)."""
        if not self.tended():
            return []
        if self.active:
            return [self.next_at, self.step_down_at()]
        return [self.next_at]

    def tend(self):
        """Renew (active) or try to take (standby) the leader lock."""
        if not self.tended():
            return
        now = time.monotonic()
        if now < self.next_at and not (
                self.active and now >= self.step_down_at()):
            return
        ttl = self.lock.ttl
        try:
            if self.active:
                if self.lock.renew():
                    self.next_at = now + ttl / 3.0
                    self.warned = None
                else:
                    return self.step_down('lost the leader lock (taken '
                                          'by %s)' % self.lock.holder())
            elif self.lock.acquire():
                self.become_active()
            else:
                self.next_at = now + min(0.5, ttl / 4.0)
            self.warned = None
        except LeaderError as e:
            if str(e) != self.warned:
                log.warning('leader lock: %s', e)
                self.warned = str(e)
            self.next_at = now + min(0.5, ttl / 4.0)
        if self.active and time.monotonic() >= self.step_down_at():
            self.step_down('could not renew the leader lock in time')

    def become_active(self):
        self.active = True
        self.next_at = time.monotonic() + self.lock.ttl / 3.0
        log.info('leader lock %s taken: active, starting %d worker(s)',
                 self.lock.describe(), self.arbiter.num_workers)
        sd_notify('STATUS=active, %d workers' % self.arbiter.num_workers)

    def step_down(self, why):
        """Stand by: stop every worker before the lease can expire."""
        a = self.arbiter
        self.active = False
        a.spare.discard('standing down')
        expiry = self.lock.expires
        log.error('standing down: %s; stopping %d worker(s) before the '
                  'lease expires', why, len(a.procs))
        kill_by = time.monotonic() + self.step_down_grace()
        if expiry != float('inf'):
            kill_by = min(kill_by, expiry - min(1.0, self.lock.ttl / 10.0))
        for proc in list(a.procs.values()):
            a.stop_worker(proc, 'standing down')
            if proc.kill_at is not None:
                proc.kill_at = min(proc.kill_at, kill_by)
        self.next_at = time.monotonic() + min(0.5, self.lock.ttl / 4)
        sd_notify('STATUS=standby')


###############################################################################
# Scoreboard ##################################################################
###############################################################################

class PackedInts(object):
    """``ints[i] = n`` on a buffer of 8-byte ints, through struct."""
    __slots__ = ('buf', 'pack')

    def __init__(self, buf):
        self.buf = buf
        self.pack = struct.Struct('q').pack_into

    def __setitem__(self, i, value):
        self.pack(self.buf, i * 8, value)


class Scoreboard(object):
    """Per-worker-process cells in an anonymous shared mmap.

    Workers write their heartbeat and request count here with plain memory
    stores: no system call per run (gunicorn #1305 pays an fchmod per
    request).  The master reads it for timeouts and ``status``.  Cells are
    per process, not per slot: during a reload the old and the new worker of
    a slot live side by side.

    Cell layout (8-byte fields): pid, state, requests, run_started
    (monotonic, 0 when idle), booted_at, exit_reason, init_rss (MB right
    after init, when a memory limit is set), 1 spare; then a per-cell text
    area for a boot failure reason.
    """
    FIELDS = 8
    PID, STATE, REQUESTS, RUN_STARTED, BOOTED_AT, REASON, INIT_RSS = range(7)
    TEXT = 240
    # Cell states (worker-written).
    BOOTING, BOOTED = 1, 2
    # Exit reasons (worker-written, read at reap).
    R_NONE, R_MAX_REQUESTS, R_MEMORY, R_ORPHANED = 0, 1, 2, 3
    R_NAMES = {1: 'max_requests reached', 2: 'soft memory limit',
               3: 'master gone'}

    def __init__(self, capacity=4096):
        self.capacity = capacity
        self.cell_bytes = self.FIELDS * 8
        size = capacity * (self.cell_bytes + self.TEXT)
        self.mm = mmap.mmap(-1, size)
        self.q = memoryview(self.mm).cast('q')
        self.d = memoryview(self.mm).cast('d')
        # The per-run store of the request count: a memoryview store on
        # CPython (~25 ns); on PyPy that costs ~130 ns a call and
        # struct.pack_into, which its JIT turns into a plain store, ~1 ns.
        self.wq = PackedInts(self.mm) if IS_PYPY else self.q
        self.free = list(range(capacity - 1, -1, -1))

    def alloc(self, pid_placeholder=0):
        if not self.free:
            raise OSError(errno.ENOSPC, 'scoreboard full (%d worker '
                          'processes)' % self.capacity)
        cell = self.free.pop()
        base = cell * self.FIELDS
        for i in range(self.FIELDS):
            self.q[base + i] = 0
        self.q[base + self.STATE] = self.BOOTING
        self.set_text(cell, '')
        return cell

    def release(self, cell):
        self.q[cell * self.FIELDS + self.STATE] = 0
        self.free.append(cell)

    def get(self, cell, field):
        return self.q[cell * self.FIELDS + field]

    def getf(self, cell, field):
        return self.d[cell * self.FIELDS + field]

    def set(self, cell, field, value):
        self.q[cell * self.FIELDS + field] = value

    def setf(self, cell, field, value):
        self.d[cell * self.FIELDS + field] = value

    def _text_offset(self, cell):
        return self.capacity * self.cell_bytes + cell * self.TEXT

    def set_text(self, cell, text):
        # Cut on a character boundary: a reason in status must not end
        # in half a character (U+FFFD when read back).
        data = text.encode('utf-8', 'replace')[:self.TEXT - 1].decode(
            'utf-8', 'ignore').encode('utf-8')
        off = self._text_offset(cell)
        self.mm[off:off + self.TEXT] = data + b'\0' * (self.TEXT - len(data))

    def text(self, cell):
        off = self._text_offset(cell)
        raw = self.mm[off:off + self.TEXT]
        return raw.split(b'\0', 1)[0].decode('utf-8', 'replace')

    def close(self):
        self.q.release()
        self.d.release()
        self.mm.close()


###############################################################################
# Workers #####################################################################
###############################################################################

# Signal that makes a worker write every thread's stack to the log and die
# (faulthandler, chained to the default action: no core file, works even
# when the worker is stuck in C code).  Used by the master on timeout.  A
# real-time signal nobody sends by hand: USR2 is the master's upgrade
# signal, and a `pkill -USR2 -f` that also hits the workers must not kill
# them (they ignore it).  USR2 where there are no real-time signals.
DUMP_SIGNAL = (signal.SIGRTMIN + 5 if hasattr(signal, 'SIGRTMIN')
               else signal.SIGUSR2)

# The master's signals that a worker (and the spare) ignores: TTIN/TTOU
# would *stop* a process by default, HUP and USR2 end it: a `pkill -TTIN`
# or `pkill -USR2` aimed at the master must not freeze or kill its workers.
IGNORED_IN_CHILDREN = ('HUP', 'TTIN', 'TTOU', 'WINCH', 'USR2')


# The config build_worker is building this process's worker for (None
# elsewhere, e.g. Manager mode's templates in the user's script).
_building = [None]


class WorkerRuntime(object):
    """A worker process's runtime state, kept out of the user's Worker
    subclass: the loops, RunWatch, Publisher and the master's child side
    read and write ``worker._ph``, so that no attribute a user gives a
    subclass can collide with one of theirs (``_ph`` is the one reserved
    name).  Set by Worker.__init__ and completed by _boot in the child."""

    __slots__ = ('board', 'cell', 'boot_fd', 'logfile', 'dump_fd',
                 'check_parent', 'exit_reason', 'runner', 'wake_r', 'wake_w',
                 'accept_lock', 'pausing', 'idle_runs', 'publisher',
                 'in_request', 'term_at', 'last_failure', 'failure_streak')

    def __init__(self):
        self.board = self.cell = self.boot_fd = None   # scoreboard cell
        self.logfile = self.dump_fd = None
        self.check_parent = False     # no parent-death signal: poll ppid
        self.exit_reason = Scoreboard.R_NONE
        self.runner = None            # the worker_type's loop object
        self.wake_r = self.wake_w = None   # signal wake-up pipe
        self.accept_lock = None
        self.pausing = False          # in a sleep of the loop's own
        self.idle_runs = 0            # runs that handled nothing (RunWatch)
        self.publisher = None
        self.in_request = False       # SyncWorker: inside handle_request
        self.term_at = None           # SyncWorker: when TERM came
        self.last_failure = 0.0       # _run_failed's pause after failures
        self.failure_streak = 0


class Worker(object):
    """Base class of the code that runs in worker processes.

    Methods you implement:
        init()        once, in the new worker process, before the loop
        run()         one unit of work; return True when a request was
                      handled (counts towards max_requests)
        after_run()   on a graceful exit (TERM, max_requests, memory), not
                      after KILL or a quick stop
        handle(conn, addr)   with ``bind``: called per accepted connection
                      instead of run()
        on_exception(e)      after an exception from run() was logged

    Attributes you may read (in the worker process):
        cfg       the Config (typed values; unknown keys as strings)
        log       a logging.Logger
        slot      1..N; a replacement gets the slot of the one it replaces
        pid       this worker's pid
        requests  requests handled so far
        alive     False once the worker was asked to stop
        sockets   listening sockets when ``bind`` is set
        args, kwargs   what the constructor was given
        name      "<name>-<n>" (uliweb style)

    With worker_class from a config, ``__init__`` runs in each worker
    process, after the fork and after dropping to ``user`` (build_worker):
    the master never runs it, so it may open a socket or a file of the
    worker's own (as ProcessHandler's did); ``self.cfg`` is the worker's
    config once Worker.__init__ has run.  In Manager mode the instances
    are the ones the user's script built (in its own process, the
    master's); each worker process starts from a copy.  Keyword options
    override the config per worker instance (uliweb's Manager style):
    max_requests, max_requests_jitter, timeout, graceful_timeout,
    soft_memory_limit, hard_memory_limit, interval (``check_point`` is the
    uliweb name for interval).  Any other keyword lands in ``self.kwargs``.

    Reserved: ``self._ph`` (the runtime's state, see WorkerRuntime) and
    the methods whose names start with ``_``.
    """

    worker_type = None   # None: the config's worker_type; else forced
    accept_timeout = 1.0  # seconds an idle accept waits before checking alive

    OPTIONS = ('max_requests', 'max_requests_jitter', 'timeout',
               'graceful_timeout', 'soft_memory_limit', 'hard_memory_limit',
               'interval')
    _counter = [0]

    def __init__(self, log=None, max_requests=None, soft_memory_limit=None,
                 hard_memory_limit=None, timeout=None, check_point=None,
                 name=None, args=None, kwargs=None, interval=None,
                 max_requests_jitter=None, graceful_timeout=None, **extra):
        Worker._counter[0] += 1
        self.name = '%s-%d' % (name or 'Process', Worker._counter[0])
        self.log = log or logging.getLogger('processhandler.worker')
        self.args = tuple(args or ())
        self.kwargs = dict(kwargs or {})
        self.kwargs.update(extra)
        if check_point is not None and interval is None:
            interval = check_point
        given = dict(max_requests=max_requests,
                     max_requests_jitter=max_requests_jitter,
                     timeout=timeout, graceful_timeout=graceful_timeout,
                     soft_memory_limit=soft_memory_limit,
                     hard_memory_limit=hard_memory_limit, interval=interval)
        self.options = dict((k, v) for k, v in given.items() if v is not None)
        soft = self.options.get('soft_memory_limit')
        hard = self.options.get('hard_memory_limit')
        if soft and hard and hard <= soft:
            raise ConfigError('%s: hard_memory_limit must exceed '
                              'soft_memory_limit' % self.name)
        # In a worker process, build_worker's config (the one _boot sets
        # again): a default Config() costs ~0.3 ms in a fresh child.
        self.cfg = _building[0] if _building[0] is not None else Config()
        self.slot = 0
        self.pid = None
        self.requests = 0
        self.alive = True
        self.sockets = []
        self._ph = WorkerRuntime()   # the runtime's state, not the user's

    # -- the API -------------------------------------------------------------

    def init(self):
        """Called once in the worker process before the first run()."""
        self.log.debug('%s %d created', self.name, self.pid)

    def run(self):
        """One unit of work.  Return True when a request was handled.

        This default (uliweb's) only logs and sleeps: a Worker runs on its
        own for a try-out."""
        self.log.info('%s %d running', self.name, self.pid)
        time.sleep(1)
        return True

    def after_run(self):
        """Called when the worker leaves its loop gracefully."""

    def on_exception(self, e):
        """Called after an exception from run() was logged."""

    def on_finished(self):
        """uliweb hook: the loop ended without an exception."""

    def stop(self):
        """Ask the loop to end after the current run (graceful)."""
        self.alive = False
        ph = getattr(self, '_ph', None)
        if ph is not None and ph.runner is not None:
            ph.runner.wake()

    def handle(self, conn, addr):
        """With ``bind``: serve one accepted connection (closed after).
        In asyncio workers: ``async def handle(self, reader, writer)``."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg, file_logger=None, ppid=None, sockets=None):
        """Build the instance for a config's ``worker_class`` (the one
        place that knows each style's constructor: a plain Worker takes
        no argument, a SyncWorker ProcessHandler's four)."""
        return cls()

    # -- settings as seen by this worker ---------------------------------------

    def setting(self, key):
        """The per-instance option ``key`` if given, else the config's."""
        return self.options.get(key, getattr(self.cfg, key))

    # -- process life (in the child) -------------------------------------------

    def _boot(self, cfg, slot, board, cell, boot_fd, ppid, sockets, logfile,
              pdeathsig, dump_fd=None):
        """Set up the forked process; called by the arbiter in the child."""
        if getattr(self, '_ph', None) is None:   # __init__ not called
            self._ph = WorkerRuntime()
        self.cfg = cfg
        self.slot = slot
        self.pid = os.getpid()
        self.ppid = ppid
        self.sockets = sockets
        self._ph.board, self._ph.cell, self._ph.boot_fd = board, cell, boot_fd
        self._ph.logfile = logfile
        self._ph.dump_fd = dump_fd
        self._ph.check_parent = not pdeathsig
        self._ph.exit_reason = Scoreboard.R_NONE
        self._ph.runner = WORKER_TYPES[self.worker_type or cfg.worker_type](self)
        self._ph.wake_r, self._ph.wake_w = os.pipe()
        for fd in (self._ph.wake_r, self._ph.wake_w):
            os.set_blocking(fd, False)
        self._init_signals()
        board.set(cell, Scoreboard.PID, self.pid)

    def _init_signals(self):
        for name in IGNORED_IN_CHILDREN:
            signal.signal(getattr(signal, 'SIG' + name), signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._signal_term)
        # Ctrl-C reaches the whole foreground process group: a worker
        # finishes its job (the master makes a second Ctrl-C a QUIT).
        signal.signal(signal.SIGINT, self._signal_term)
        signal.signal(signal.SIGQUIT, self._signal_quit)
        signal.signal(signal.SIGUSR1, self._signal_usr1)
        if _USR1_DEFERRED[0]:    # one came while booting (see prepare())
            _USR1_DEFERRED[0] = False
            self._signal_usr1(signal.SIGUSR1, None)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(DUMP_SIGNAL, signal.SIG_DFL)
        if self._ph.dump_fd is not None:
            try:
                import faulthandler
                faulthandler.register(DUMP_SIGNAL, file=self._ph.dump_fd,
                                      all_threads=True, chain=True)
            except (ImportError, AttributeError, ValueError, RuntimeError):
                pass
        signal.set_wakeup_fd(self._ph.wake_w)

    def _signal_term(self, signum, frame):
        self.stop()

    def _signal_quit(self, signum, frame):
        self.alive = False
        raise SystemExit(WORKER_EXIT_OK)

    def _signal_usr1(self, signum, frame):
        try:
            for extra in _EXTRA_LOGS:     # make_log / setup_file_logging
                extra.reopen()
            self._ph.logfile.reopen()
        except OSError as e:
            self.log.error('cannot reopen log file: %s', e)

    def _serve(self):
        """init() -> loop -> after_run(); return the process exit status."""
        try:
            self.init()
        except Exception as e:
            self.log.exception('init() failed: worker %d cannot boot',
                               self.slot)
            self._ph.board.set_text(self._ph.cell, 'init() raised %s: %s' % (
                type(e).__name__, e))
            return WORKER_EXIT_BOOT_ERROR
        self._announce_booted()
        try:
            self._ph.runner.run()
        except Exception as e:
            self.log.exception('worker loop failed')
            self.on_exception(e)
        else:
            self.on_finished()
        self.after_run()
        if self._ph.exit_reason:
            self._ph.board.set(self._ph.cell, Scoreboard.REASON, self._ph.exit_reason)
        return WORKER_EXIT_OK

    def _run_failed(self, e):
        """Log an exception from run(); return how long to pause.

        A run() that fails at once every time (a database down, a deleted
        folder) must not spin a core and flood the log: failures less than
        2 s apart pause 10 ms, 20 ms, ... up to 1 s.  Isolated failures do
        not pause, and the happy path pays nothing for this."""
        self.log.exception('run() raised; the loop goes on')
        try:
            self.on_exception(e)
        except Exception:
            self.log.exception('on_exception() raised')
        now = time.monotonic()
        ph = self._ph
        streak = ph.failure_streak + 1 if now - ph.last_failure < 2.0 else 0
        ph.last_failure, ph.failure_streak = now, streak
        return 0.0 if not streak else min(1.0, 0.005 * 2 ** min(streak, 8))

    def _announce_booted(self):
        b, c = self._ph.board, self._ph.cell
        if (self.setting('soft_memory_limit') or
                self.setting('hard_memory_limit')):
            # What init() left us weighing: the master backs off a slot
            # that is over its limit before any run (celery #4125).
            b.setf(c, Scoreboard.INIT_RSS, rss_mb(self.pid) or 0.0)
        b.setf(c, Scoreboard.BOOTED_AT, time.monotonic())
        b.set(c, Scoreboard.STATE, Scoreboard.BOOTED)
        try:
            os.write(self._ph.boot_fd, b'.')   # wakes the master: event, no poll
        except OSError:
            pass  # pipe full: the master is already awake

    def _max_requests(self):
        n = self.setting('max_requests')
        jitter = self.setting('max_requests_jitter')
        if n and jitter:
            n += random.randint(0, jitter)   # per process (reseeded at fork)
        return n

    def serves_sockets(self):
        """True when this worker implements handle() and has listeners."""
        return (bool(self.sockets) and
                getattr(type(self).handle, '__func__', type(self).handle)
                is not Worker.handle)

    def _loop(self):
        """The sync loop.  It is every job's overhead, so a handled run
        costs what a bare ``while alive: if run(): n += 1`` costs plus one
        attribute store (``self.requests``): the count comes from a
        ``range`` whose end is the next checkpoint, so there is no compare
        per run (see _runs).  At a checkpoint the loop looks up: is it
        max_requests, time to publish the count, or time for the slow
        path (interval, the parent check)?

        Progress, timeout stamps and the soft memory check are done from
        the side by a RunWatch thread when timeout or soft_memory_limit is
        set.  Without them a Publisher puts the request count on the
        scoreboard: every run when runs are slow, every 256 at most when
        they are fast (a store per run would cost a quarter of a bare
        loop), and whenever a run handled nothing."""
        run = self._serve_connection if self.serves_sockets() else self.run
        limit = self._max_requests() or 0
        slow_path = bool(self.setting('interval') or self._ph.check_parent)
        watch = RunWatch.start(self)
        n = self.requests
        self._ph.publisher = Publisher(self, n) if watch is None else None
        upcoming = (self._ph.publisher.due if self._ph.publisher else
                    n + self.CHECKPOINT_RUNS)
        try:
            while self.alive:
                stop_at = n + 1 if slow_path else upcoming
                if limit and limit < stop_at:
                    stop_at = limit
                n = self._runs(run, n, stop_at)
                if n < stop_at:
                    break                       # stopped
                if n == limit:
                    self.log.info('%d requests handled: max_requests '
                                  'reached, recycling', n)
                    self._ph.exit_reason = Scoreboard.R_MAX_REQUESTS
                    break
                if (self._ph.publisher is not None and
                        n >= self._ph.publisher.due):
                    self._ph.publisher.publish(n)
                upcoming = (self._ph.publisher.due if self._ph.publisher else
                            n + self.CHECKPOINT_RUNS)
                if slow_path and not self._slow_path():
                    break
        finally:
            if watch is not None:
                watch.stop()
            self._ph.board.set(self._ph.cell, Scoreboard.REQUESTS, self.requests)

    # A range end when nothing else is due: small enough for ints to stay
    # one digit (fast arithmetic), large enough to cost nothing.
    CHECKPOINT_RUNS = 1 << 20

    def _runs(self, run, n, stop_at):
        """Call run() until ``stop_at`` requests are handled or the worker
        is stopped; return the count handled.  The hot loop: the outer
        ``for`` counts handled runs, the inner ``while`` repeats runs that
        handled nothing (each goes through _idle: publish, pause, parent
        check)."""
        for n in range(n + 1, stop_at + 1):
            while self.alive:
                try:
                    if run():
                        break
                except Exception as e:
                    self._pause(self._run_failed(e))
                if not self._idle(n - 1):
                    return n - 1
            else:
                return n - 1
            self.requests = n
        return stop_at

    def _idle(self, n):
        """After a run that handled nothing (``n`` handled so far): count
        it for RunWatch, publish, and the slow path.  False: stop."""
        self._ph.idle_runs += 1
        if self._ph.publisher is not None and self._ph.publisher.shown != n:
            self._ph.publisher.publish(n)
        return self._slow_path()

    def _slow_path(self):
        """Between runs when interval or the parent check is on: False to
        leave the loop."""
        if self._ph.check_parent and os.getppid() != self.ppid:
            self.log.warning('master %d is gone: exiting', self.ppid)
            self._ph.exit_reason = Scoreboard.R_ORPHANED
            return False
        interval = self.setting('interval')
        if interval and self.alive:
            self._pause(interval)
        return True

    def _pause(self, seconds):
        """A sleep of the loop's own between runs (interval, after a
        failure): RunWatch must not count it as a run taking long."""
        if not seconds:
            return
        self._ph.pausing = True
        try:
            self.sleep(seconds)
        finally:
            self._ph.pausing = False

    def sleep(self, seconds):
        """Sleep up to ``seconds``; return early when a signal arrives."""
        deadline = time.monotonic() + seconds
        while self.alive:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                r, _, _ = select.select([self._ph.wake_r], [], [], left)
            except InterruptedError:
                continue
            if r:
                try:
                    while os.read(self._ph.wake_r, 4096):
                        pass
                except OSError:
                    pass

    @property
    def nr(self):
        """ProcessHandler's name for ``requests``."""
        return self.requests

    # -- socket serving (sync / thread / gevent) ---------------------------------

    def _serve_connection(self):
        """run() of a socket worker: accept one connection and handle() it.

        Waits up to accept_timeout for a listener to become readable, so an
        idle worker still notices a stop.  With accept_lock only the lock
        holder waits in accept (no thundering herd); the lock is released
        before handle() runs.
        """
        lock = self._ph.accept_lock
        conn = None
        if lock is not None and not lock.acquire(self.accept_timeout):
            return False
        try:
            try:
                ready, _, _ = select.select(self.sockets, [], [],
                                            self.accept_timeout)
            except (InterruptedError, ValueError):
                return False
            for sock in ready:
                try:
                    conn, addr = sock.accept()
                    break
                except (BlockingIOError, InterruptedError):
                    continue      # another worker was faster
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                   errno.ENOMEM):
                        self.log.error('accept failed: %s', e.strerror)
                        self.sleep(0.1)
                    continue
        finally:
            if lock is not None:
                lock.release()
        if conn is None:
            return False
        try:
            conn.setblocking(True)
            handled = self._handle_accepted(sock, conn, addr)
        finally:
            conn.close()
        return handled is not False

    def _handle_accepted(self, sock, conn, addr):
        """Serve one connection accepted on listener ``sock``."""
        self.handle(conn, addr)
        return True


class Publisher(object):
    """Puts a sync loop's request count on the scoreboard, as often as is
    cheap: every run while runs take over 2 ms, then every 2, 4, ... up to
    ``MAX_STEP`` runs while they are faster (one clock read per
    publication decides).  ``due`` is the count at which to publish
    next.  The count is exact when the worker is idle (a run that
    handled nothing publishes) and at exit.  Under load it lags by at most
    MAX_STEP runs: nothing while runs are instant, and when they turn slow
    after a fast burst, up to MAX_STEP of the slow ones before the step
    falls back to 1.  A publication is a checkpoint of the loop, one clock
    read and one store (~0.8 us on this 2-core VM): every 256 runs, ~3 ns
    per run (every 64, a fast loop ran at 0.70x of a bare one instead of
    0.80x).  """

    MAX_STEP = 256
    FAST = 0.002

    def __init__(self, worker, n):
        self.board, self.cell = worker._ph.board, worker._ph.cell
        self.q = worker._ph.board.wq
        self.i = worker._ph.cell * Scoreboard.FIELDS + Scoreboard.REQUESTS
        self.shown = n
        self.due = n + 1
        self.step = 1
        self.last = time.monotonic()

    def publish(self, n):
        self.q[self.i] = self.shown = n
        now = time.monotonic()
        step = self.step
        if now - self.last >= self.FAST:
            step = 1
        elif step < self.MAX_STEP:
            step += step
        self.step, self.last, self.due = step, now, n + step


class MemoryCheck(object):
    """The worker's own check of its soft memory limit: /proc/self/statm
    every check_interval seconds (from RunWatch in sync workers, between
    runs in the others).  The master enforces both limits too."""

    def __init__(self, worker):
        self.worker = worker
        self.soft = worker.setting('soft_memory_limit')
        self.every = worker.cfg.check_interval
        self.next = (time.monotonic() + self.every if self.soft else
                     float('inf'))

    def due(self):
        if self.next == float('inf'):
            return False
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.every
        return True

    def over_soft(self):
        rss = rss_mb(os.getpid())
        if rss is not None and rss > self.soft:
            self.worker.log.warning(
                'RSS %.1f MB is over soft_memory_limit %g MB: exiting '
                'gracefully', rss, self.soft)
            return True
        return False


class RunWatch(object):
    """Watches a sync worker's loop from a thread, so the loop itself does
    no clock read and no shared-memory store per run.

    Every ``tick`` it looks at the loop's run counters: when they moved, the
    run in progress started after the previous look, and "now" goes to the
    scoreboard as its start (the master's timeout check reads it; a run is
    never killed early, at most one tick late).  A run stuck in Python or
    in C, with or without the GIL, stops the counter and so the stamps.
    It also publishes the request count for ``status`` and checks the soft
    memory limit every check_interval; over it, the worker stops after the
    current run, as a graceful stop would.
    """

    def __init__(self, worker, timeout, memory):
        self.worker = worker
        self.memory = memory
        # 20 looks per timeout (a timeout=1 kill is at most 50 ms late),
        # at most every 50 ms; without a timeout only memory is due.
        self.tick = min(0.05, timeout / 20.0) if timeout else memory.every
        self.timed = bool(timeout)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch,
                                       name='processhandler-runwatch')
        self.thread.daemon = True

    @classmethod
    def start(cls, worker):
        """A started watcher, or None when there is nothing to watch."""
        timeout = worker.setting('timeout')
        memory = MemoryCheck(worker)
        if not timeout and not memory.soft:
            return None
        watch = cls(worker, timeout, memory)
        watch.thread.start()
        return watch

    def mark(self):
        # Every finished run moves one of the two (reads of two ints the
        # loop stores anyway: a handled run sets requests, another one
        # counts in w._ph.idle_runs).
        w = self.worker
        return (w.requests, w._ph.idle_runs)

    def watch(self):
        w = self.worker
        board, cell = w._ph.board, w._ph.cell
        last = None
        next_memory = self.memory.next
        while not self.done.wait(self.tick):
            now = time.monotonic()
            if self.timed:
                mark = self.mark()
                if w._ph.pausing:
                    last = None
                    board.setf(cell, Scoreboard.RUN_STARTED, 0.0)
                elif mark != last:
                    last = mark
                    board.setf(cell, Scoreboard.RUN_STARTED, now)
            board.set(cell, Scoreboard.REQUESTS, w.requests)
            if now >= next_memory:
                next_memory = now + self.memory.every
                if w.alive and self.memory.over_soft():
                    w._ph.exit_reason = Scoreboard.R_MEMORY
                    w.stop()
                    try:
                        os.write(w._ph.wake_w, b'.')   # end a loop pause
                    except OSError:
                        pass

    def stop(self):
        self.done.set()
        self.thread.join()
        self.worker._ph.board.setf(self.worker._ph.cell, Scoreboard.RUN_STARTED,
                                0.0)


class RequestInterrupted(BaseException):
    """Raised in a SyncWorker's handle_request() that is still running
    near the end of graceful_timeout after TERM (BaseException: user code's
    ``except Exception`` must not swallow it)."""


class SyncWorker(Worker):
    """ProcessHandler-style worker: implement ``handle_request()``.

    Without listeners each ``handle_request()`` call is one request; with
    ``bind`` the loop accepts and calls ``handle_request(sock, client,
    addr)`` per connection (the client is closed after it returns).  The
    constructor keeps ProcessHandler's signature ``(cfg, file_logger, ppid,
    sockets)`` and its attributes (max_requests, nr, alive, booted, ppid,
    file_logger, LISTENERS, rd_fds, worker_name); ``setup()``,
    ``init_process()`` and ``stop()`` may be overridden (call super).

    ProcessHandler's TERM ended a worker at once (``os._exit``): its jobs
    may loop for ever inside handle_request().  Here TERM asks the loop to
    stop after the current request; a request still running shortly
    before graceful_timeout is interrupted (RequestInterrupted) so the
    worker still exits gracefully instead of being KILLed.
    """

    MAXSIZE = (1 << 31) - 1      # ProcessHandler's "no max_requests"

    def __init__(self, cfg=None, file_logger=None, ppid=None, sockets=None,
                 **kwargs):
        Worker.__init__(self, **kwargs)
        if cfg is not None:
            self.cfg = cfg
        self.file_logger = file_logger or logging.getLogger()
        self.ppid = ppid
        self.LISTENERS = sockets or []
        self.booted = False
        self.rd_fds = None
        self.worker_name = 'worker: %s' % (self.cfg.proc_name or '')

    @classmethod
    def from_config(cls, cfg, file_logger=None, ppid=None, sockets=None):
        """ProcessHandler built its worker as ``cls(cfg, file_logger, ppid,
        sockets)`` (in the worker process, after the fork)."""
        return cls(cfg, file_logger, ppid, sockets)

    @property
    def max_requests(self):
        """ProcessHandler's name; a huge number when there is no limit."""
        return self.setting('max_requests') or self.MAXSIZE

    @max_requests.setter
    def max_requests(self, value):
        self.options['max_requests'] = 0 if value == self.MAXSIZE else value

    @Worker.nr.setter
    def nr(self, value):
        self.requests = value

    def setup(self):
        """ProcessHandler hook, called from init_process()."""

    def init_process(self):
        """ProcessHandler hook, called once in the worker process."""
        self.setup()
        self.rd_fds = list(self.LISTENERS) if self.LISTENERS else None
        self.booted = True

    def init(self):
        self.LISTENERS = self.sockets
        self.worker_name = 'worker: %s' % self.cfg.proc_name
        self.init_process()

    def run(self):
        return self._request(self.handle_request)

    def _handle_accepted(self, sock, conn, addr):
        return self._request(self.handle_request, sock, conn, addr)

    def handle_request(self, sock=None, client=None, addr=None):
        raise NotImplementedError('implement handle_request()')

    def _request(self, fn, *args):
        """Call handle_request; False if TERM had to interrupt it."""
        try:
            self._ph.in_request = True
            fn(*args)
        except RequestInterrupted:
            return False
        finally:
            self._ph.in_request = False
        return True

    def serves_sockets(self):
        return bool(self.sockets)

    def _signal_term(self, signum, frame):
        Worker._signal_term(self, signum, frame)
        # Only the sync loop runs requests in the main thread, where the
        # SIGALRM handler's exception lands.
        if (self._ph.in_request and not self._ph.runner.concurrent and
                hasattr(signal, 'setitimer')):
            # Leave the end of graceful_timeout to after_run() and the exit.
            grace = self.setting('graceful_timeout')
            self._ph.term_at = time.monotonic()
            signal.signal(signal.SIGALRM, self._interrupt_request)
            signal.setitimer(signal.ITIMER_REAL,
                             max(0.01, grace - min(0.5, grace / 4.0)))

    def _interrupt_request(self, signum, frame):
        if not self._ph.in_request:
            return      # it returned meanwhile: the loop is ending anyway
        self.log.warning(
            'handle_request() still running %.2fs after TERM: interrupting '
            'it so that worker %d stops within graceful_timeout (%gs)',
            time.monotonic() - self._ph.term_at, self.slot,
            self.setting('graceful_timeout'))
        raise RequestInterrupted()


class AcceptLock(object):
    """Serialises accept() across worker processes (and their threads).

    A POSIX lock on a file the master opened before forking: record locks
    belong to processes, so every worker competes for it; a thread lock in
    front of it makes threads of one worker take turns too.
    """

    def __init__(self, fd, threaded=False, cooperative=False):
        self.fd = fd
        self.local = None
        self.cooperative = cooperative
        if threaded:
            import threading
            self.local = threading.Lock()

    def acquire(self, timeout):
        if self.local is not None and not self.local.acquire(True, timeout):
            return False
        try:
            if self.cooperative:
                self._poll(timeout)
            else:
                fcntl.lockf(self.fd, fcntl.LOCK_EX)
        except OSError:
            if self.local is not None:
                self.local.release()
            return False
        return True

    def _poll(self, timeout):
        # A blocking lockf() would stall every greenlet of the process:
        # try without blocking and yield (time.sleep is gevent's here).
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if (e.errno not in (errno.EACCES, errno.EAGAIN) or
                        time.monotonic() > deadline):
                    raise
            time.sleep(0.002)

    def release(self):
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        finally:
            if self.local is not None:
                self.local.release()


class SyncLoop(object):
    """How a worker process runs its run() calls: one class per
    worker_type.  A new worker type is a subclass of this plus a row in
    WORKER_TYPES (name -> class; the setting's choices come from there).

    What the master and the accept lock need to know, as class
    attributes, and the hook run in the new process:"""

    concurrent = False   # runs overlap (a run's timeout stamp is shared)
    threaded = False     # threads (or tasks): the accept lock adds a mutex
    cooperative = False  # greenlets: the accept lock must not block the hub
    requires = None      # the optional package it needs (start/check say)

    @classmethod
    def prepare_child(cls):
        """In the worker process, before the worker code is imported (in
        the spare: before it is used).  Return True when code imported
        earlier must be imported afresh (gevent: it was not patched)."""
        return False

    def __init__(self, worker):
        self.worker = worker

    def run(self):
        self.worker._loop()

    def wake(self):
        """stop() was called (from a signal handler): wake any sleeper."""


class ThreadLoop(SyncLoop):
    """``threads`` run loops in threads sharing the request count, the
    limits and the stop.  timeout applies to each run() call: the
    scoreboard holds the start of the oldest run in progress."""

    concurrent = True
    threaded = True

    def run(self):
        import threading
        w = self.worker
        n = max(1, w.cfg.threads)
        self.lock = threading.Lock()
        self.starts = [0.0] * n
        self.stopped = threading.Event()
        self.max_requests = w._max_requests()
        self.in_flight = 0   # runs started and not yet uncounted
        self.timed = w.setting('timeout') > 0
        self.interval = w.setting('interval')
        self.memory = MemoryCheck(w)
        self.run_one = w._serve_connection if w.serves_sockets() else w.run
        threads = [self.spawn(i) for i in range(n)]
        while w.alive and any(t.is_alive() for t in threads):
            w.sleep(w.cfg.check_interval)   # woken by signals
            if self.memory.due() and self.memory.over_soft():
                self.finish(Scoreboard.R_MEMORY)
            if w._ph.check_parent and os.getppid() != w.ppid:
                self.finish(Scoreboard.R_ORPHANED)
        for t in threads:
            t.join()

    def spawn(self, i):
        import threading
        t = threading.Thread(target=self.body, args=(i,),
                             name='worker-%d-%d' % (self.worker.slot, i))
        t.daemon = True
        t.start()
        return t

    def wake(self):
        self.stopped.set()

    def finish(self, reason):
        self.worker._ph.exit_reason = reason
        self.worker.alive = False
        self.wake()

    def mark(self, i, value):
        d = self.worker._ph.board
        with self.lock:
            self.starts[i] = value
            active = [x for x in self.starts if x]
            d.setf(self.worker._ph.cell, Scoreboard.RUN_STARTED,
                   min(active) if active else 0.0)

    def take_ticket(self):
        """May one more run start?  Not when the runs done plus those in
        flight already reach max_requests: a worker never handles more
        than max_requests, whatever its number of threads."""
        with self.lock:
            if (self.max_requests and
                    self.worker.requests + self.in_flight >=
                    self.max_requests):
                return False
            self.in_flight += 1
            return True

    def body(self, i):
        w = self.worker
        try:
            while w.alive:
                if not self.take_ticket():
                    self.stopped.wait(0.05)   # until those in flight end
                    continue
                if self.timed:
                    self.mark(i, time.monotonic())
                try:
                    handled = self.run_one()
                except Exception as e:
                    handled = False
                    self.stopped.wait(w._run_failed(e))
                if self.timed:
                    self.mark(i, 0.0)
                if handled:
                    self.count()
                else:
                    with self.lock:
                        self.in_flight -= 1
                if self.interval and w.alive:
                    self.stopped.wait(self.interval)
        finally:
            try:
                os.write(w._ph.wake_w, b'x')   # tell the main thread
            except OSError:
                pass

    def count(self):
        w = self.worker
        with self.lock:
            self.in_flight -= 1
            w.requests += 1
            w._ph.board.set(w._ph.cell, Scoreboard.REQUESTS, w.requests)
            done = self.max_requests and w.requests >= self.max_requests
        if done and w.alive:
            w.log.info('%d requests handled: max_requests reached, '
                       'recycling', w.requests)
            self.finish(Scoreboard.R_MAX_REQUESTS)


class GeventLoop(ThreadLoop):
    """``threads`` run loops in greenlets.  The arbiter monkey-patches the
    process right after fork, before the worker code is imported, so the
    thread machinery of ThreadLoop runs on greenlets."""

    cooperative = True
    requires = 'gevent'

    @classmethod
    def prepare_child(cls):
        cls.patch()
        return True

    @staticmethod
    def patch():
        try:
            from gevent import monkey
        except ImportError:
            raise ConfigError("worker_type = gevent needs the gevent package"
                              " (pip install gevent)")
        monkey.patch_all()


class AsyncioLoop(SyncLoop):
    """``threads`` concurrent tasks of ``async def run(self)`` (or, with
    ``bind``, an asyncio server calling ``async def handle(reader,
    writer)``).  A graceful stop lets every run in flight finish; nothing
    is cancelled (the master KILLs after graceful_timeout)."""

    concurrent = True
    threaded = True

    def run(self):
        import asyncio
        asyncio.run(self.main())

    def wake(self):
        ev = getattr(self, 'stopped', None)
        if ev is not None:
            self.loop.call_soon_threadsafe(ev.set)

    async def main(self):
        import asyncio
        w = self.worker
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        self.max_requests = w._max_requests()
        self.memory = MemoryCheck(w)
        self.timed = w.setting('timeout') > 0
        self.interval = w.setting('interval')
        n = max(1, w.cfg.threads)
        self.starts = [0.0] * n
        self.in_flight = 0   # runs started, not finished (see body)
        for sig in (signal.SIGTERM, signal.SIGINT):   # INT: see Worker
            self.loop.add_signal_handler(sig, w.stop)
        self.loop.add_signal_handler(signal.SIGQUIT, self.quit)
        self.loop.add_signal_handler(signal.SIGUSR1, w._signal_usr1, 0, None)
        if w.serves_sockets():
            await self.serve()
        else:
            await asyncio.gather(*[self.body(i) for i in range(n)])

    def quit(self):
        sys.stdout.flush()
        os._exit(WORKER_EXIT_OK)

    def mark(self, i, value):
        w = self.worker
        self.starts[i] = value
        active = [x for x in self.starts if x]
        w._ph.board.setf(w._ph.cell, Scoreboard.RUN_STARTED,
                      min(active) if active else 0.0)

    async def body(self, i):
        import asyncio
        w = self.worker
        while w.alive:
            if (self.max_requests and
                    w.requests + self.in_flight >= self.max_requests):
                # Never more than max_requests runs per worker: wait for
                # those in flight (they may not count) or for the stop.
                try:
                    await asyncio.wait_for(self.stopped.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
                continue
            self.in_flight += 1
            if self.timed:
                self.mark(i, time.monotonic())
            try:
                result = w.run()
                if asyncio.iscoroutine(result):
                    result = await result
                handled = result
            except Exception as e:
                handled = False
                pause = w._run_failed(e)
                if pause:
                    try:
                        await asyncio.wait_for(self.stopped.wait(), pause)
                    except asyncio.TimeoutError:
                        pass
            finally:
                self.in_flight -= 1
            if self.timed:
                self.mark(i, 0.0)
            if handled:
                self.count()
            self.checks()
            if w.alive:
                if self.interval:
                    try:
                        await asyncio.wait_for(self.stopped.wait(),
                                               self.interval)
                    except asyncio.TimeoutError:
                        pass
                else:
                    await asyncio.sleep(0)   # let the other tasks run

    def count(self):
        w = self.worker
        w.requests += 1
        w._ph.board.set(w._ph.cell, Scoreboard.REQUESTS, w.requests)
        if (self.max_requests and w.requests >= self.max_requests and
                w.alive):
            w.log.info('%d requests handled: max_requests reached, '
                       'recycling', w.requests)
            w._ph.exit_reason = Scoreboard.R_MAX_REQUESTS
            w.stop()

    def checks(self):
        w = self.worker
        if self.memory.due() and self.memory.over_soft():
            w._ph.exit_reason = Scoreboard.R_MEMORY
            w.stop()
        if w._ph.check_parent and os.getppid() != w.ppid:
            w._ph.exit_reason = Scoreboard.R_ORPHANED
            w.stop()

    async def serve(self):
        """asyncio server on the inherited listeners; handle() per
        connection; stop accepting on stop, let connections finish."""
        import asyncio
        w = self.worker
        active = set()

        async def on_connect(reader, writer):
            task = asyncio.current_task()
            active.add(task)
            i = len(active) - 1 if len(active) <= len(self.starts) else 0
            try:
                if self.timed:
                    self.mark(i, time.monotonic())
                await w.handle(reader, writer)
            except Exception as e:
                w.log.exception('handle() raised')
                w.on_exception(e)
            finally:
                if self.timed:
                    self.mark(i, 0.0)
                active.discard(task)
                writer.close()
                self.count()
                self.checks()

        servers = [await asyncio.start_server(on_connect, sock=sock)
                   for sock in w.sockets]
        await self.stopped.wait()
        for srv in servers:
            srv.close()
        if active:
            await asyncio.gather(*active, return_exceptions=True)


# Worker types: name -> loop class.  Optional dependencies (gevent) are
# imported lazily, in the worker process.
WORKER_TYPES = {'sync': SyncLoop, 'thread': ThreadLoop,
                'gevent': GeventLoop, 'asyncio': AsyncioLoop}


class ThreadWorker(Worker):
    """A Worker whose run() loops run in ``threads`` threads."""
    worker_type = 'thread'


class GeventWorker(Worker):
    """A Worker whose run() loops run in ``threads`` greenlets."""
    worker_type = 'gevent'


def line_buffered_stdio():
    """In a worker: print() goes out at each newline.  Daemonized, stdout
    is the log file, block-buffered: a worker killed (KILL, timeout, hard
    memory limit) lost every line still in its buffer."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError, OSError):
            pass   # not a TextIOWrapper (replaced by the user): theirs


def build_worker(cls, cfg, ppid, sockets, file_logger=None):
    """Build the worker object of this process, in the worker process.

    Called after the fork and after the privilege drop: the master never
    runs a worker's ``__init__`` (the ProcessHandler seed built its worker
    after the fork too, so an ``__init__`` may open a socket or a file of
    its own).  ProcessHandler-style classes take ``(cfg, file_logger, ppid,
    sockets)``; ours take keywords only.  The one place where a worker
    object is constructed from its class.  Worker.__init__ reads the
    config from ``_building``."""
    _building[0] = cfg
    try:
        return cls.from_config(cfg, file_logger, ppid, sockets)
    finally:
        _building[0] = None


class AsyncioWorker(Worker):
    """A Worker with ``async def run(self)`` (``threads`` tasks)."""
    worker_type = 'asyncio'


###############################################################################
# Loading worker code #########################################################
###############################################################################

def load_worker_class(cfg, reload=False):
    """Import ``cfg.worker_class`` ('module:Class') with base_path on
    sys.path.  ``reload``: forget the user's modules first (HUP).
    Raises ConfigError with one line."""
    if not cfg.worker_class:
        raise ConfigError('%s worker_class: required (module:Class)'
                          % cfg.where())
    module_name, _, class_name = cfg.worker_class.partition(':')
    install_processhandler_aliases()   # ProcessHandler-era imports
    if cfg.base_path not in sys.path:
        sys.path.insert(0, cfg.base_path)
    saved = {}
    if reload:
        saved = forget_user_modules(cfg.base_path)
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except BaseException as e:   # SystemExit, HaltServer... at import too
        if isinstance(e, KeyboardInterrupt):
            raise
        sys.modules.update(saved)
        if isinstance(e, AttributeError):
            why = 'module %s has no %s%s' % (module_name, class_name,
                                             class_hint(module, class_name))
        elif isinstance(e, SystemExit):
            why = 'SystemExit(%r) at import' % (e.code,)
        else:
            why = '%s: %s' % (type(e).__name__, e)
        raise ConfigError('%s worker_class: cannot import %s (%s)' % (
            cfg.where(), cfg.worker_class, ' '.join(str(why).split())))
    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        raise ConfigError('%s worker_class: %s is not a subclass of '
                          'processhandler.Worker' % (cfg.where(),
                                                     cfg.worker_class))
    return cls


def class_hint(module, name):
    """"; did you mean 'JobExecute'?" among the module's classes."""
    classes = [k for k, v in vars(module).items()
               if isinstance(v, type) and not k.startswith('_')]
    close = difflib.get_close_matches(name, classes, n=1, cutoff=0.6)
    if not close:     # case slips: jobexecute for JobExecute
        close = [c for c in classes if c.lower() == name.lower()]
    return "; did you mean '%s'?" % close[0] if close else ''


def is_coroutine_function(fn):
    """inspect.iscoroutinefunction without importing inspect, which a
    child that dropped privileges may no longer be able to read."""
    code = getattr(getattr(fn, '__func__', fn), '__code__', None)
    return bool(code is not None and code.co_flags & 0x80)  # CO_COROUTINE


def worker_class_problems(cfg, cls):
    """What makes ``cls`` unable to run under ``cfg``, one line each
    (refused by start and reported by check)."""
    problems = []
    if cfg.worker_type == 'sync':
        for name in ('run', 'handle'):
            if is_coroutine_function(getattr(cls, name, None)):
                problems.append(
                    "%s worker_type: %s.%s is 'async def' but worker_type "
                    "is sync (it would never be awaited): set worker_type "
                    "= asyncio" % (cfg.where(), cls.__name__, name))
    needs = WORKER_TYPES[cfg.worker_type].requires
    if needs and not package_available(needs):
        problems.append('%s worker_type: %s is not installed for %s '
                        '(pip install %s)' % (cfg.where(), needs,
                                              sys.executable, needs))
    return problems + compat_problems(cls, cfg)


def package_available(name):
    """Whether ``name`` imports, without importing it into the master
    (gevent must be imported after fork, to monkey-patch the worker
    only)."""
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def validate_in_child(cfg, reload=False, timeout=None):
    """Import and check ``cfg.worker_class`` in a forked child: return
    None, or the problems, one line each.

    Whatever the import does (raise, SystemExit, hang -- killed after
    ``timeout``, default the boot timeout --, os._exit) costs the caller
    nothing.  With ``user`` set under root the child drops privileges
    first: no user code ever runs as root (gunicorn loads application
    code in its workers, after the drop).  ``reload``: the caller (a HUP
    in the master) imported the user's modules already: the child
    imports them afresh."""
    limit = timeout or boot_timeout_of(cfg) or 60.0
    drop = drops_privileges(cfg)
    try:
        uid, gid = (resolve_user_group(cfg.user, cfg.group) if drop
                    else (None, None))
    except ConfigError as e:
        return '%s %s' % (cfg.where(), e)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # pragma: no cover (child)
        try:
            os.close(r)
            isolate_validation_child(w)
            # The NUL says "I got this far": an import that calls
            # os._exit(0) must not pass for a clean one.
            os.write(w, _import_problems(cfg, reload, drop and (uid, gid))
                     .encode('utf-8', 'replace')[:8000] + b'\0')
        finally:
            os._exit(0)
    os.close(w)
    try:
        out, status = read_child(r, pid, limit)
    finally:
        os.close(r)
    reported = out.endswith(b'\0')
    out = out.rstrip(b'\0')
    if out:
        return out.decode('utf-8', 'replace')
    if status is None:
        return '%s worker_class: importing %s took longer than %gs' % (
            cfg.where(), cfg.worker_class, limit)
    if status != 0 or not reported:
        return '%s worker_class: importing %s ended the process (%s)' % (
            cfg.where(), cfg.worker_class, describe_status(status))
    return None



def isolate_validation_child(keep):
    """In validate_in_child's child, before any user code: nothing of the
    master's but stdio and ``keep`` (the result pipe).  Its pidfile, control
    socket, selector and pipes must not reach a module running as `user`
    (it could answer root's commands), nor its signal handlers (TERM must
    end this child, not be recorded for a master loop that never runs)."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:   # not the main thread
        pass
    for signum in signal.valid_signals():
        try:
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass   # SIGKILL, SIGSTOP, or one Python does not handle
    try:   # the highest open descriptor (PyPy's closerange loops)
        top = max(int(n) for n in os.listdir('/proc/self/fd')) + 1
    except (OSError, ValueError):
        top = os.sysconf('SC_OPEN_MAX')
    os.closerange(3, keep)
    os.closerange(keep + 1, max(top, keep + 1))
    # A log file's descriptor is closed now: records go to stderr (the
    # log too, in a daemon), with a count of failures of their own.
    for h in logging.getLogger().handlers:
        if isinstance(h, LogFileHandler) and h.logfile.fd > 2:
            h.logfile = LogFile()

def _import_problems(cfg, reload, drop_to):
    """In validate_in_child's child: '' or the problems, one a line."""
    try:   # in a master: its signals are not ours to wake it for
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    as_user = ''
    if drop_to:
        drop_privileges(*drop_to)
        as_user = ' (as user %s)' % cfg.user
    try:
        cls = load_worker_class(cfg, reload=reload)
        lines = worker_class_problems(cfg, cls) or gevent_imports(cfg)
    except ConfigError as e:
        lines = [str(e) + as_user]
    except BaseException as e:   # KeyboardInterrupt at import
        lines = ['%s worker_class: importing %s%s raised %s%s' % (
            cfg.where(), cfg.worker_class, as_user, type(e).__name__,
            (': %s' % e) if str(e) else '')]
    return '\n'.join(lines)


def read_child(fd, pid, timeout):
    """What child ``pid`` writes to ``fd`` until EOF, and its wait status
    (None, after KILL, when it took longer than ``timeout``)."""
    deadline = time.monotonic() + timeout
    out = b''
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return out, None
        data = os.read(fd, 65536)
        if not data:
            return out, os.waitpid(pid, 0)[1]
        out += data


def privilege_notes(cfg):
    """``user``/``group`` that would not do what they say: (error, warning),
    each one line or None.  ``group`` alone would leave root workers at uid
    0 with another group: refused.  ``user`` under a master that is not
    root cannot be applied: said once, the workers run as the master."""
    if cfg.group and not cfg.user:
        return ('%s group: set without user: the workers would keep uid %d; '
                'set user too' % (cfg.where(), os.geteuid())), None
    if cfg.user and os.geteuid() != 0:
        uid, _ = resolve_user_group(cfg.user, None)
        if uid != os.geteuid():
            return None, ('%s user: %s not applied: the master runs as uid '
                          '%d, not root, so the workers run as uid %d too'
                          % (cfg.where(), cfg.user, os.geteuid(),
                             os.geteuid()))
    return None, None


def unsafe_import_folders(cfg):
    """One line per folder a root master imports from that another user
    may write: processhandler.py's own (on sys.path[0] when a USR2 or a
    lean re-exec runs it by path, unless python -I) and base_path (put on
    sys.path first for the worker module).  A module planted there (a
    json.py, say) would run as root at the next upgrade or preflight."""
    if os.geteuid() != 0:
        return []
    folders = [] if isolated_path() else [
        ('processhandler.py', os.path.dirname(os.path.abspath(__file__)),
         ', or run python -I')]
    # With `user` set the root master never imports the worker code (a
    # child that dropped privileges does), so base_path is no root import.
    if cfg.base_path and not drops_privileges(cfg):
        folders.append(('the worker code (base_path)', cfg.base_path, ''))
    lines = []
    for what, folder, hint in folders:
        who = writable_by_others(folder)
        if who:
            lines.append('%s %s, the folder of %s, is writable by %s: a '
                         'USR2 upgrade or re-exec of the root master would '
                         'import what is planted there; keep it in a '
                         'root-owned folder others cannot write%s'
                         % (cfg.where(), folder, what, who, hint))
    return lines


def writable_by_others(folder):
    """Who besides root may create files in ``folder`` (a description),
    or None."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    if st.st_uid not in (0, os.geteuid()):
        return 'its owner, uid %d' % st.st_uid
    if st.st_mode & 0o002:
        return 'every user'
    if st.st_mode & 0o020 and st.st_gid != 0:
        return 'group %d' % st.st_gid
    return None


def drops_privileges(cfg):
    """True when workers drop from root to ``user``: then no user code may
    run with root's privileges, in the master or in a command."""
    return bool(cfg.user) and os.geteuid() == 0


def master_worker_class(cfg, reload=False, isolate=False, timeout=None):
    """The worker class as a master (or a command) may hold it; raises
    ConfigError naming every problem.

    When the workers drop to ``user`` from root it is only checked in a
    child that dropped privileges first, and None is returned (each worker
    imports it itself, after its drop).  Otherwise it is imported here --
    after a check in a child first when ``isolate`` (a HUP: an import that
    exits or hangs must not take the master with it)."""
    if isolate or drops_privileges(cfg):
        problem = validate_in_child(cfg, reload=reload, timeout=timeout)
        if problem:
            raise ConfigError(problem.replace('\n', '; '))
    if drops_privileges(cfg):
        return None
    cls = load_worker_class(cfg, reload=reload)
    for problem in worker_class_problems(cfg, cls):
        raise ConfigError(problem)
    return cls


def forget_user_modules(base_path):
    """Drop modules loaded from under base_path (not this one) from
    sys.modules so the next import reads them again; return them."""
    this = sys.modules.get('processhandler') or sys.modules[__name__]
    root = os.path.join(os.path.realpath(base_path), '')
    gone = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, '__file__', None)
        if mod is this or name == '__main__' or not f:
            continue
        if os.path.realpath(f).startswith(root):
            gone[name] = sys.modules.pop(name)
    return gone


###############################################################################
# Arbiter #####################################################################
###############################################################################

class State(object):
    """Worker process states (supervisor style: ints, names, one setter)."""
    BOOTING = 10     # forked; init() has not returned yet
    RUNNING = 20     # init() returned; the loop runs
    STOPPING = 30    # asked to stop (TERM/QUIT/KILL sent); being reaped
    EXITED = 40      # reaped
    # Slot-only states, for status rows without a process.
    BACKOFF = 50     # failed; next attempt at slot.backoff_until
    STOPPED = 60     # not wanted (WINCH) or waiting for its turn

    NAMES = {10: 'booting', 20: 'running', 30: 'stopping', 40: 'exited',
             50: 'backoff', 60: 'stopped'}
    LIVE = (BOOTING, RUNNING, STOPPING)


class WorkerProcess(object):
    """The master's record of one forked worker process."""

    def __init__(self, pid, slot, cell, generation, options, cfg):
        self.pid = pid
        self.slot = slot
        self.cell = cell
        self.generation = generation
        self.state = State.BOOTING
        self.spawned = time.monotonic()
        self.kill_at = None           # KILL deadline once stopping
        self.stop_reason = None
        self.stop_requested = None    # monotonic time of the TERM/QUIT
        self.timed_out = False
        self.boot_timeout = boot_timeout_of(cfg)
        self.boot_timed_out = False   # killed for not booting in time
        self.dump_fd = None           # faulthandler's output (timeout)
        # Limits the master enforces: per worker instance (Manager mode),
        # else config.
        self.timeout = options.get('timeout', cfg.timeout)
        self.graceful_timeout = options.get('graceful_timeout',
                                            cfg.graceful_timeout)
        self.soft_limit = options.get('soft_memory_limit',
                                      cfg.soft_memory_limit)
        self.hard_limit = options.get('hard_memory_limit',
                                      cfg.hard_memory_limit)
        # uliweb workers (Manager mode) decide with their
        # reached_*_memory_limit(mem), called here in the master as uliweb's
        # Manager did (set by spawn_worker from the template).
        self.reached = None

    def over_limit(self, kind, rss):
        if self.reached is not None:
            try:
                return self.reached(kind, rss)
            except Exception:   # user code: never the master's end
                log.exception('reached_%s_memory_limit() raised; using '
                              'the number', kind)
        limit = self.hard_limit if kind == 'hard' else self.soft_limit
        return bool(limit) and rss > limit


class SpareProcess(object):
    """The master's record of the pre-forked spare (see Spare).

    It was forked from the master of ``generation``, has done every
    slot-independent step of a worker's start (signals, fds, privileges,
    parent-death signal) and blocks reading ``pipe_w``'s other end for
    "slot cell keep_dump".  What it inherited must still be valid when it
    is used: a reload, a log reopen or a stop discards it."""

    def __init__(self, pid, pipe_w, dump_fd, generation):
        self.pid = pid
        self.pipe_w = pipe_w
        self.dump_fd = dump_fd
        self.generation = generation
        self.forked = time.monotonic()


_NO_OPTIONS = {}   # config mode and adopted workers: the config's limits


class Slot(object):
    """A numbered place for a worker: 1..N, stable across restarts."""

    def __init__(self, number):
        self.number = number
        self.proc = None        # the current generation's process
        self.old = []           # older generations still serving (reload)
        self.failures = 0       # consecutive boot failures / early deaths
        self.early_deaths = 0   # working workers that died early, in a row
        self.backoff_until = 0.0
        self.last_error = None
        self.finished = False   # done for good (see Arbiter.slot_finished)

    def procs(self):
        return ([self.proc] if self.proc else []) + self.old

    def forget(self, proc):
        if self.proc is proc:
            self.proc = None
        elif proc in self.old:
            self.old.remove(proc)


def describe_status(status):
    """A waitpid() status in words."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            rt = getattr(signal, 'SIGRTMIN', 0)
            name = ('SIGRTMIN+%d' % (sig - rt) if rt and
                    rt <= sig <= signal.SIGRTMAX else 'signal %d' % sig)
        return 'killed by %s' % name
    if os.WIFEXITED(status):
        return 'exit status %d' % os.WEXITSTATUS(status)
    return 'status %d' % status


# -- control server -------------------------------------------------------------

class ControlServer(object):
    """The master's control socket (unix, mode 0600) for the CLI.

    One JSON request per connection, one JSON reply.  Only root and the
    master's own uid may talk to it (SO_PEERCRED).  ``requests`` maps a
    request's ``cmd`` to a method ``fn(req, conn)``: it returns the reply,
    or None when it keeps ``conn`` to answer later with ``reply()``.
    """

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.path = None
        self.sock = None
        self.buffers = {}       # conn -> bytes received so far
        self.requests = {'status': self.request_status,
                         'incr': self.request_scale,
                         'decr': self.request_scale,
                         'metrics': self.request_metrics,
                         'health': self.request_metrics}

    def open(self):
        """Bind the socket beside the pidfile and watch it."""
        a = self.arbiter
        path = self.path = control_path(a.pidfile.path)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)   # ours: we hold the instance lock
        except OSError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise HaltServer('cannot create control socket %s: %s'
                             % (path, e.strerror))
        finally:
            os.umask(old)
        sock.listen(16)
        sock.setblocking(False)
        self.sock = sock
        a.selector.register(sock, selectors.EVENT_READ, self.accept)

    def close(self):
        if self.sock is None:
            return
        try:
            self.arbiter.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.sock.close()
        self.sock = None

    def accept(self, sock):
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        if not self.peer_allowed(conn):
            conn.close()
            return
        conn.setblocking(False)
        self.arbiter.selector.register(conn, selectors.EVENT_READ, self.read)
        self.buffers[conn] = b''

    def peer_allowed(self, conn):
        cred = peercred_option()
        if cred is None:   # not Linux: the socket's mode 0600 guards it
            return True
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, cred,
                                  struct.calcsize('3i'))
            uid = struct.unpack('3i', raw)[1]
        except OSError:
            return False
        return uid in (0, os.geteuid())

    def read(self, conn):
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        buf = self.buffers.get(conn, b'') + data
        if data and b'\n' not in buf and len(buf) < 65536:
            self.buffers[conn] = buf
            return
        self.arbiter.selector.unregister(conn)
        self.buffers.pop(conn, None)
        if b'\n' not in buf:
            if data:   # 64 KiB and no end of line: say so, not just close
                self.reply(conn, {'ok': False, 'error': 'request too long '
                                  '(over %d bytes)' % (len(buf) - 1)})
            else:      # the client left before its request ended
                conn.close()
            return
        reply = self.handle(buf.split(b'\n', 1)[0], conn)
        if reply is not None:
            self.reply(conn, reply)

    def handle(self, line, conn):
        """The reply to one request line (None: a handler answers later)."""
        try:
            req = json.loads(line.decode('utf-8'))
            cmd = req['cmd']
            fn = self.requests.get(cmd)
        except (ValueError, KeyError, TypeError):
            return {'ok': False, 'error': 'bad request'}
        if fn is None:
            return {'ok': False, 'error': 'unknown command %r' % (cmd,)}
        try:
            return fn(req, conn)
        except Exception as e:
            # A bug behind one request must not take the master down, nor
            # leave the command guessing: log it, answer with its name.
            log.exception('control request %r failed', cmd)
            return {'ok': False, 'error': 'internal error in %s: %s: %s' % (
                cmd, type(e).__name__, e)}

    def reply(self, conn, doc):
        """Send ``doc`` as one JSON line and close the connection."""
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            conn.sendall(json.dumps(doc).encode('utf-8') + b'\n')
        except OSError:
            pass
        finally:
            conn.close()

    def request_metrics(self, req, conn):
        return self.arbiter.metrics.answer(req)

    def request_status(self, req, conn):
        return self.arbiter.status()

    def request_scale(self, req, conn):
        """incr / decr N."""
        a = self.arbiter
        n = req.get('n', 1)
        if not isinstance(n, int) or n < 1:
            return {'ok': False, 'error': 'N must be a positive number'}
        if req['cmd'] == 'incr' and a.num_workers + n > MAX_WORKERS:
            return {'ok': False, 'error': 'incr %d refused: %d + %d worker(s) '
                    'would exceed the maximum of %d' % (
                        n, a.num_workers, n, MAX_WORKERS)}
        target = (a.num_workers + n if req['cmd'] == 'incr' else
                  max(1, a.num_workers - n))
        a.set_num_workers(target, req['cmd'])
        a.manage_workers()
        return {'ok': True, 'number_workers': a.num_workers}


# -- metrics ------------------------------------------------------------------
#
# What the master knows, counted by Metrics through one-line hooks in the
# Arbiter (worker exit, backoff, reload) and read from its records when
# asked.  Three outlets: the `metrics` / `health` control requests, a tiny
# HTTP/1.0 responder for Prometheus on metrics_bind and statsd packets to
# statsd_host.  Both network outlets live in the master's one selector
# loop (non-blocking sockets, deadlines in next_deadline): no thread, and a
# slow client or a dead statsd server can never stall or raise into it.

class Metrics(object):
    """Counters fed by the Arbiter, and the outlets that publish them.

    Requests per slot survive recycles: a reaped worker's count moves into
    ``requests_done`` and the live workers' counts are read from the
    scoreboard when asked."""

    COMMANDS = ('metrics', 'health')   # control requests answered here
    EXIT_REASONS = ('max_requests', 'memory', 'timeout', 'crash',
                    'boot_failure', 'signal', 'stopped', 'exited')
    STATSD_INTERVAL = 1.0     # seconds between statsd flushes
    HTTP_TIMEOUT = 5.0        # a scrape taking longer is dropped
    HTTP_MAX_REQUEST = 8192   # bytes of request head accepted
    HTTP_MAX_CONNS = 16       # scrapes served at once; more are refused
    HEALTH_BOOT_GRACE = 10.0  # a recycled slot may boot this long and
                              # still count as healthy

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.requests_done = {}   # slot -> requests of its reaped workers
        self.exits = dict.fromkeys(self.EXIT_REASONS, 0)
        self.backoffs = 0
        self.reload_started = None
        self.http = None          # the metrics_bind listener
        self.conns = {}           # scrape socket -> [deadline, in, out]
        self.statsd = None        # (UDP socket, address)
        self.prefix = ''
        self.sent = {}            # statsd counters: total at the last flush
        self.next_flush = float('inf')

    # -- hooks (one line each in the Arbiter) ----------------------------------

    def worker_exited(self, proc, status):
        """Before the scoreboard cell is released: keep its request count
        and classify the exit."""
        board = self.arbiter.board
        n = board.get(proc.cell, Scoreboard.REQUESTS)
        self.requests_done[proc.slot] = (
            self.requests_done.get(proc.slot, 0) + n)
        self.exits[self.exit_reason(proc, status)] += 1

    def exit_reason(self, proc, status):
        board = self.arbiter.board
        reason = board.get(proc.cell, Scoreboard.REASON)
        if proc.timed_out:
            return 'timeout'
        if reason == Scoreboard.R_MEMORY or proc.stop_reason in (
                'soft memory limit', 'hard memory limit'):
            return 'memory'
        if reason == Scoreboard.R_MAX_REQUESTS:
            return 'max_requests'
        if proc.state == State.STOPPING:
            return 'stopped'       # asked: reload, decr, stop, standby
        if board.get(proc.cell, Scoreboard.STATE) != Scoreboard.BOOTED:
            return 'boot_failure'
        if os.WIFSIGNALED(status):
            return 'signal'
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return 'exited'
        return 'crash'

    def slot_failed(self, slot):
        self.backoffs += 1

    def reloaded(self):
        self.reload_started = time.monotonic()

    # -- what the master knows ---------------------------------------------------

    def requests_by_slot(self):
        a = self.arbiter
        totals = dict(self.requests_done)
        for n in a.slots:
            totals.setdefault(n, 0)
        for proc in a.procs.values():
            totals[proc.slot] = (totals.get(proc.slot, 0) +
                                 a.board.get(proc.cell, Scoreboard.REQUESTS))
        return totals

    def slot_counts(self, now):
        """(running, booting, backoff) slots among the wanted ones."""
        a = self.arbiter
        running = booting = backoff = 0
        for n in range(1, a.wanted() + 1):
            slot = a.slots.get(n)
            proc = slot and slot.proc
            if proc is not None and proc.state == State.RUNNING:
                running += 1
            elif proc is not None and proc.state == State.BOOTING:
                booting += 1
            elif slot is not None and slot.backoff_until > now:
                backoff += 1
        return running, booting, backoff

    def snapshot(self):
        """The numbers as a dict (the `metrics` request with format json)."""
        a, now = self.arbiter, time.monotonic()
        running, booting, backoff = self.slot_counts(now)
        return {'uptime': round(now - a.started, 3),
                'generation': a.generation, 'active': a.active,
                'wanted': a.wanted(), 'running': running,
                'booting': booting, 'backoff': backoff,
                'spawns': a.spawns, 'backoffs': self.backoffs,
                'exits': dict(self.exits),
                'requests': self.requests_by_slot()}

    def rss_by_slot(self):
        """RSS in bytes of each slot's current worker (one per slot, so
        a rolling reload does not give one label set two values)."""
        out = {}
        for n, slot in sorted(self.arbiter.slots.items()):
            rss = rss_mb(slot.proc.pid) if slot.proc is not None else None
            if rss is not None:
                out[n] = int(rss * 1024 * 1024)
        return out

    # -- health --------------------------------------------------------------------

    def health(self):
        """(healthy, one line saying why)."""
        a, now = self.arbiter, time.monotonic()
        if a.stopping:
            return False, 'stopping'
        if not a.active:
            if a.leadership.warned:
                return False, 'standby; leader lock unreachable: %s' % (
                    a.leadership.warned)
            return True, 'standby: the leader lock %s is held elsewhere' % (
                a.leader.describe())
        wanted, running, notes, healthy = a.wanted(), 0, [], True
        for n in range(1, wanted + 1):
            ok, why = self.slot_health(a.slots.get(n), n, now)
            running += why is None
            healthy = healthy and ok
            if why:
                notes.append(why)
        parts = ['%d/%d running' % (running, wanted)] + notes
        if self.rolling():
            parts.append('reload in progress for %.0f s' % (
                now - (self.reload_started or a.started)))
        return healthy and a.ready, '; '.join(parts)

    def slot_health(self, slot, n, now):
        """(serves, why not running or None) for slot n.  It serves while
        its new worker boots and the old generation still runs (rolling
        reload), or while a replacement for a worker that ended normally
        boots (a recycle) for under HEALTH_BOOT_GRACE seconds."""
        proc = slot and slot.proc
        if proc is not None and proc.state == State.RUNNING:
            return True, None
        if proc is not None and proc.state == State.BOOTING:
            if any(p.state == State.RUNNING for p in slot.old):
                return True, None
            took = now - proc.spawned
            return (slot.failures == 0 and took < self.HEALTH_BOOT_GRACE,
                    'slot %d booting for %.1f s' % (n, took))
        if proc is not None:
            return False, 'slot %d %s' % (n, State.NAMES[proc.state])
        if slot is not None and slot.backoff_until > now:
            return False, 'slot %d in backoff: %s' % (n, slot.last_error)
        return False, 'slot %d not started' % n

    def rolling(self):
        a = self.arbiter
        return any(s.old or s.proc is not None and
                   s.proc.generation < a.generation
                   for s in a.slots.values())

    def answer(self, req):
        """The `metrics` and `health` control requests."""
        if req['cmd'] == 'health':
            healthy, why = self.health()
            return {'ok': True, 'healthy': healthy, 'reason': why,
                    'pid': self.arbiter.pid}
        if req.get('format') == 'json':
            return {'ok': True, 'metrics': self.snapshot()}
        return {'ok': True, 'text': self.exposition()}

    # -- Prometheus text exposition (format 0.0.4) --------------------------------

    def exposition(self):
        snap = self.snapshot()
        p = 'processhandler_'
        fams = [
            (p + 'master_uptime_seconds', 'gauge',
             'seconds since the master started', [({}, snap['uptime'])]),
            (p + 'master_generation', 'gauge', 'config generation (+1 per '
             'reload)', [({}, snap['generation'])]),
            (p + 'master_active', 'gauge', '1 active, 0 standby (leader '
             'lock held elsewhere)', [({}, int(snap['active']))]),
            (p + 'workers_wanted', 'gauge', 'worker slots to keep',
             [({}, snap['wanted'])]),
            (p + 'workers_running', 'gauge', 'slots whose worker runs',
             [({}, snap['running'])]),
            (p + 'slots_backoff', 'gauge', 'slots waiting to retry a '
             'failed worker', [({}, snap['backoff'])]),
            (p + 'requests_total', 'counter', 'requests handled, per slot '
             '(kept across recycles)', [({'slot': n}, v) for n, v in
                                        sorted(snap['requests'].items())]),
            (p + 'worker_exits_total', 'counter', 'worker exits by reason',
             [({'reason': r}, snap['exits'][r]) for r in self.EXIT_REASONS]),
            (p + 'worker_spawns_total', 'counter', 'worker processes started',
             [({}, snap['spawns'])]),
            (p + 'backoffs_total', 'counter', 'failures that put a slot in '
             'backoff', [({}, snap['backoffs'])]),
            (p + 'worker_rss_bytes', 'gauge', "resident memory of each "
             "slot's worker", [({'slot': n}, v) for n, v in
                               self.rss_by_slot().items()])]
        lines = []
        for name, kind, doc, samples in fams:
            lines.append('# HELP %s %s' % (name, doc))
            lines.append('# TYPE %s %s' % (name, kind))
            for labels, value in samples:
                tags = ','.join('%s="%s"' % kv for kv in sorted(
                    labels.items()))
                lines.append('%s%s %s' % (name, '{%s}' % tags if tags
                                          else '', value))
        return '\n'.join(lines) + '\n'

    # -- outlets: open / close -------------------------------------------------------

    def open(self):
        """Called once from setup: listen on metrics_bind, resolve
        statsd_host (the only lookups; the loop never resolves)."""
        cfg = self.arbiter.cfg
        if cfg.metrics_bind:
            self.http = create_listener(cfg.metrics_bind)
            self.arbiter.selector.register(self.http, selectors.EVENT_READ,
                                           self.accept_http)
            log.info('metrics at http://%s/metrics', cfg.metrics_bind)
        if cfg.statsd_host:
            self.open_statsd(cfg)

    def open_statsd(self, cfg):
        family, (host, port) = parse_address(cfg.statsd_host)
        try:
            info = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
            sock = socket.socket(info[0], socket.SOCK_DGRAM)
        except (OSError, socket.gaierror) as e:
            log.error('statsd_host %s: %s; no statsd metrics',
                      cfg.statsd_host, getattr(e, 'strerror', None) or e)
            return
        sock.setblocking(False)
        self.statsd = (sock, info[4])
        prefix = (cfg.statsd_prefix or '').strip('.')
        self.prefix = (prefix + '.' if prefix else '') + 'processhandler.'
        self.next_flush = time.monotonic()
        log.info('statsd metrics to %s every %gs', cfg.statsd_host,
                 self.STATSD_INTERVAL)

    def close(self, child=False):
        """Close every socket; ``child``: in a fresh fork, whose selector
        is gone already (a worker must not hold a scrape open)."""
        socks = list(self.conns) + [self.http] + [
            self.statsd and self.statsd[0]]
        for sock in socks:
            if sock is None:
                continue
            if not child:
                try:
                    self.arbiter.selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
            sock.close()
        self.conns, self.http, self.statsd = {}, None, None

    # -- outlets: the loop's part ---------------------------------------------------

    def due(self):
        """The next deadline (a statsd flush, a scrape to drop), or inf."""
        if not self.conns:
            return self.next_flush
        return min([self.next_flush] + [c[0] for c in self.conns.values()])

    def tick(self):
        if not self.conns and self.statsd is None:
            return       # every loop turn: nothing to do costs nothing
        now = time.monotonic()
        for sock, state in list(self.conns.items()):
            if now >= state[0]:
                self.drop(sock)
        if now >= self.next_flush:
            self.next_flush = now + self.STATSD_INTERVAL
            self.flush_statsd()

    # -- outlet: HTTP/1.0 for Prometheus --------------------------------------

    def accept_http(self, sock):
        try:
            conn, _ = sock.accept()
        except OSError:      # EAGAIN (another wake-up took it), EMFILE
            return
        if len(self.conns) >= self.HTTP_MAX_CONNS:
            conn.close()
            return
        conn.setblocking(False)
        self.conns[conn] = [time.monotonic() + self.HTTP_TIMEOUT, b'', b'']
        self.arbiter.selector.register(conn, selectors.EVENT_READ,
                                       self.read_http)

    def read_http(self, conn):
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if not data:
            return self.drop(conn)
        state = self.conns[conn]
        buf = state[1] + data
        head = b'\r\n\r\n' in buf or b'\n\n' in buf
        if not head and len(buf) <= self.HTTP_MAX_REQUEST:
            state[1] = buf
            return
        self.arbiter.selector.modify(conn, selectors.EVENT_WRITE,
                                     self.write_http)
        state[2] = self.http_response(buf if head else b'')
        self.write_http(conn)

    def http_response(self, head):
        words = head.split(b'\n', 1)[0].split()
        method, path = (words + [b'', b''])[:2]
        status, body = '200 OK', b''
        if not head or len(words) != 3:
            status = '400 Bad Request'
        elif method not in (b'GET', b'HEAD'):
            status = '405 Method Not Allowed'
        elif path.split(b'?')[0] != b'/metrics':
            status, body = '404 Not Found', b'try /metrics\n'
        else:
            body = self.exposition().encode('utf-8')
        out = ('HTTP/1.0 %s\r\nContent-Type: text/plain; version=0.0.4; '
               'charset=utf-8\r\nContent-Length: %d\r\nConnection: close'
               '\r\n\r\n' % (status, len(body))).encode('ascii')
        return out + (body if method != b'HEAD' else b'')

    def write_http(self, conn):
        state = self.conns.get(conn)
        if state is None:
            return
        try:
            sent = conn.send(state[2])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.drop(conn)
        state[2] = state[2][sent:]
        if state[2]:
            return
        # Lingering close: FIN first, then read what the client still
        # sends until it closes; closing with unread bytes would send a
        # RST that can destroy the response before the client reads it.
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            return self.drop(conn)
        state[0] = min(state[0], time.monotonic() + 1.0)
        self.arbiter.selector.modify(conn, selectors.EVENT_READ, self.linger)

    def linger(self, conn):
        try:
            if conn.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.drop(conn)

    def drop(self, conn):
        self.conns.pop(conn, None)
        try:
            self.arbiter.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    # -- outlet: statsd over UDP ------------------------------------------------------

    def flush_statsd(self):
        """Gauges as they are, counters as the increase since the last
        flush; gunicorn's names where it has one (workers, requests)."""
        if self.statsd is None:
            return
        snap = self.snapshot()
        counters = {'requests': sum(snap['requests'].values()),
                    'spawns': snap['spawns'], 'backoffs': snap['backoffs']}
        for reason, n in snap['exits'].items():
            counters['exits.' + reason] = n
        packets = ['%s:%d|g' % kv for kv in (
            ('workers', snap['running']), ('workers.wanted', snap['wanted']),
            ('backoff', snap['backoff']), ('generation', snap['generation']),
            ('active', int(snap['active'])), ('uptime', snap['uptime']))]
        for name, total in sorted(counters.items()):
            delta = total - self.sent.get(name, 0)
            self.sent[name] = total
            if delta > 0:
                packets.append('%s:%d|c' % (name, delta))
        sock, addr = self.statsd
        for packet in packets:
            try:   # UDP, non-blocking: a full buffer or no server drops it
                sock.sendto((self.prefix + packet).encode('ascii'), addr)
            except OSError:
                pass


# -- Upgrade (USR2) -------------------------------------------------------------

class ReloadCheck(object):
    """The HUP's check of the new worker code, in the background.

    A forked child runs validate_in_child() (which imports the code in a
    grandchild, with the privilege drop, the time limit and the success
    marker) and writes its verdict -- '' or the problems, then NUL -- to
    a pipe.  The master keeps serving meanwhile (reaping, respawning,
    control requests, the watchdog, the leader lease): it learns the
    verdict when reap_workers() reaps the child.  A HUP arriving while a
    check runs sets ``again``: that check's verdict is dropped and a new
    one starts from the config as it is then (HUPs coalesce)."""

    SLACK = 5.0   # beyond the import limit: the child's own bookkeeping

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.pid = self.fd = self.cfg = None
        self.deadline = None
        self.again = False

    def owns(self, pid):
        return self.pid is not None and pid == self.pid

    def start(self, cfg, timeout):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # pragma: no cover (child)
            try:
                signal.set_wakeup_fd(-1)
                os.close(r)
                problem = validate_in_child(cfg, reload=True,
                                            timeout=timeout)
                os.write(w, (problem or '').encode('utf-8', 'replace')
                         [:8000] + b'\0')
            finally:
                os._exit(0)
        os.close(w)
        self.pid, self.fd, self.cfg = pid, r, cfg
        self.deadline = time.monotonic() + timeout + self.SLACK
        self.again = False

    def exited(self, status):
        """Reaped: the problems ('' when none), one a line."""
        out = b''
        try:
            while True:   # written before the exit: all in the pipe
                data = os.read(self.fd, 65536)
                if not data:
                    break
                out += data
        except OSError:
            pass
        os.close(self.fd)
        self.pid = self.fd = self.deadline = None
        if out.endswith(b'\0') and status == 0:
            return out.rstrip(b'\0').decode('utf-8', 'replace')
        return ('the check of the worker code ended (%s)' %
                describe_status(status))

    def check_deadline(self):
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.cancel()

    def cancel(self):
        """KILL the check (too slow, or the master stops); reaped as
        usual, its verdict then says it was killed."""
        if self.pid is not None:
            self.deadline = None
            self.arbiter.kill(self.pid, signal.SIGKILL)


class UpgradeState(object):
    """What a USR2 re-exec hands to the new image, as one record.

    It crosses execve() as JSON in the environment (UPGRADE_ENV): the
    descriptors named here stay open across the exec, everything else is
    rebuilt by the new image.  ``config`` is the old image's config, the
    fallback when the file no longer loads after the exec."""

    FIELDS = ('pidfile', 'lock_fd', 'instance', 'fds', 'accept_fd',
              'started', 'daemonized', 'number_workers', 'workers',
              'stopping', 'leader', 'config', 'upgrades',
              'instance_lock_fd')

    def __init__(self, **values):
        for name in self.FIELDS:
            setattr(self, name, values.get(name))

    def to_env(self, env):
        """Put the record into ``env`` (a dict) for execve()."""
        env[UPGRADE_ENV] = json.dumps(dict(
            (name, getattr(self, name)) for name in self.FIELDS))
        return env

    @classmethod
    def from_env(cls, environ=None, keep=False):
        """The record a USR2 re-exec handed over, or None; popped from the
        environment (workers must not see it) unless ``keep``."""
        environ = os.environ if environ is None else environ
        raw = (environ.get(UPGRADE_ENV) if keep else
               environ.pop(UPGRADE_ENV, None))
        if not raw:
            return None
        try:
            values = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(values, dict):
            return None
        return cls(**values)

    @staticmethod
    def config_record(cfg):
        return {'values': dict((s.name, getattr(cfg, s.name))
                               for s in SETTINGS),
                'extras': cfg.extras, 'path': cfg.path,
                'section': cfg.section, 'overrides': cfg.overrides}

    def previous_config(self):
        """The old image's Config (paths are absolute already)."""
        c = self.config
        return Config(c['values'], c['extras'], path=c['path'],
                      section=c['section'],
                      overrides=[tuple(kv) for kv in c['overrides']])


# Problems the new image of a USR2 met after the exec and worked around
# (main() meets the first ones before any Arbiter exists); Upgrade logs
# and reports them once the log is open.
_UPGRADE_PROBLEMS = []


class Upgrade(object):
    """USR2: re-exec the master in place, and adopt the old image's workers.

    The pid stays, so the pidfile, the lock (its fd is kept open: POSIX
    locks survive execve), systemd's MAINPID and the workers' parent all
    stay valid.  The listening sockets stay open in the old workers, who
    keep accepting, and are handed to the new image by fd: no connection
    is refused.  The new image adopts the old workers as generation 0
    and replaces them like a HUP does.

    Transactional: first a preflight child runs the new image's own
    start-up (same interpreter and flags, argv, config, log file and
    listeners: upgrade_preflight()) up to the point of no return, while
    the loop goes on (its output comes through the selector, its exit
    through reap_workers).  Only when it succeeded does the master exec.
    What can still fail after the exec falls back: the previous config,
    the log on stderr, the adopted workers kept (see README).
    """

    PREFLIGHT_TIMEOUT = 60.0

    def __init__(self, arbiter, state=None):
        self.arbiter = arbiter
        self.child = None          # subprocess.Popen of the preflight
        self.output = b''
        self.pipe_r = None
        self.deadline = None
        self.count = (state.upgrades or 0) if state else 0
        self.result = 'upgrading' if state else None
        self.reason = None

    def report(self):
        """For status --json: the last upgrade and how it ended."""
        return {'count': self.count, 'result': self.result,
                'reason': self.reason}

    def start(self):
        """USR2: start the preflight; the exec follows when it passes."""
        if self.child is not None:
            log.warning('USR2 ignored: the preflight of the previous USR2 '
                        '(pid %d) is still running', self.child.pid)
            return
        self.count += 1
        self.result, self.reason = 'preflight', None
        try:
            self.spawn_preflight()
        except OSError as e:
            self.refused('cannot run the preflight: %s' % (e.strerror or e))
            return
        log.info('USR2: preflight of the new image running (pid %d)',
                 self.child.pid)

    def refused(self, why):
        self.result, self.reason = 'failed', why
        log.error('USR2 upgrade refused, still running the old code: %s',
                  why)

    def argv(self):
        """The command line of the new image: the same interpreter, its
        -X/-W/-O flags, the original script and arguments, nothing ahead
        of the standard library on sys.path (see master_exec_argv)."""
        return master_exec_argv()

    def spawn_preflight(self):
        import subprocess
        a = self.arbiter
        state, keep = self.record()
        env = state.to_env(dict(os.environ))
        env[PREFLIGHT_ENV] = '1'
        r, w = os.pipe()
        try:
            self.child = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=w, stderr=w,
                cwd=_START['cwd'], env=env, close_fds=True,
                pass_fds=[s.fileno() for s in a.sockets])
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        os.set_blocking(r, False)
        self.pipe_r, self.output = r, b''
        self.deadline = time.monotonic() + self.PREFLIGHT_TIMEOUT
        a.selector.register(r, selectors.EVENT_READ, self.read_output)

    def read_output(self, fd):
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    return self.close_pipe()
                self.output = (self.output + data)[-65536:]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close_pipe()

    def close_pipe(self):
        if self.pipe_r is None:
            return
        try:
            self.arbiter.selector.unregister(self.pipe_r)
        except (KeyError, ValueError):
            pass
        os.close(self.pipe_r)
        self.pipe_r = None

    def owns(self, pid):
        return self.child is not None and self.child.pid == pid

    def check_deadline(self):
        """Kill a preflight that takes too long (a hung import)."""
        if (self.child is not None and self.deadline is not None and
                time.monotonic() >= self.deadline):
            self.deadline = None
            self.arbiter.kill(self.child.pid, signal.SIGKILL)
            self.reason = ('the preflight did not finish within %gs' %
                           self.PREFLIGHT_TIMEOUT)

    def preflight_exited(self, status):
        """The preflight was reaped: exec when it passed, else refuse."""
        child, self.child = self.child, None
        child.returncode = status     # reaped by us, not by Popen
        if self.pipe_r is not None:
            self.read_output(self.pipe_r)
            self.close_pipe()
        timed_out, self.deadline = self.deadline is None, None
        # Exit 0 alone is no pass: an os._exit(0) in the imported code
        # would exec an image whose start-up ends the same way.
        passed = b'upgrade preflight ok:' in self.output
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and passed:
            if self.arbiter.stopping:
                return self.refused('the master is stopping')
            return self.reexec()
        lines = [l.strip() for l in self.output.decode(
            'utf-8', 'replace').splitlines() if l.strip()]
        why = (' | '.join(lines[-3:]) or 'the preflight %s' %
               describe_status(status))
        if not status and not passed:
            why = ('the preflight ended (exit status 0) but did not report '
                   'success%s' % (': ' + ' | '.join(lines[-3:])
                                  if lines else ''))
        self.refused(self.reason if timed_out and self.reason else why)

    def record(self):
        """The UpgradeState of this master, and the fds it names."""
        a = self.arbiter
        keep = [s.fileno() for s in a.sockets] + [a.pidfile.fd]
        if a.pidfile.lock_fd is not None:
            keep.append(a.pidfile.lock_fd)
        if a.accept_fd is not None:
            keep.append(a.accept_fd)
        leader = None
        if a.leader is not None and a.active:
            leader = {'token': a.leader.token,
                      'expires': a.leader.expires
                      if a.leader.expires != float('inf') else 1e18,
                      'fd': getattr(a.leader, 'fd', None)}
            if leader['fd'] is not None:
                keep.append(leader['fd'])
        state = UpgradeState(
            pidfile=a.pidfile.path, lock_fd=a.pidfile.fd,
            instance_lock_fd=a.pidfile.lock_fd,
            instance=a.instance, fds=[s.fileno() for s in a.sockets],
            accept_fd=a.accept_fd,
            started=time.time() - (time.monotonic() - a.started),
            daemonized=a.daemonized, number_workers=a.num_workers,
            # booted: from the scoreboard (fresher than p.state): a worker
            # still in init() must not be adopted as running
            workers=[[p.pid, p.slot, a.board.get(p.cell, Scoreboard.STATE)
                      == Scoreboard.BOOTED] for p in a.procs.values()
                     if p.state in (State.BOOTING, State.RUNNING)],
            stopping=[[p.pid, p.slot] for p in a.procs.values()
                      if p.state == State.STOPPING],
            leader=leader, config=UpgradeState.config_record(a.cfg),
            upgrades=self.count)
        return state, keep

    def reexec(self):
        a = self.arbiter
        state, keep = self.record()
        argv = self.argv()
        # The spare was forked from this image: the new one forks its own.
        a.spare.discard('upgrade')
        a.spare.reap_dead()
        # The lean bootstrap (-c, many lines) would flood the record.
        log.info('USR2: re-executing %s with %d worker(s) handed over '
                 '(preflight passed)', ' '.join(
                     '<bootstrap>' if '\n' in arg else arg for arg in argv),
                 len(state.workers))
        for fd in keep:
            os.set_inheritable(fd, True)
        env = state.to_env(dict(os.environ))
        signal.set_wakeup_fd(-1)
        a.close_control()
        # execve() resets our handlers to the defaults, and the default of
        # TTIN/TTOU is to stop the process, of HUP/USR1/USR2 to kill it: a
        # signal arriving before the new image has its handlers would stop
        # or kill the master.  Blocked signals stay pending across execve;
        # init_signals() unblocks them once the handlers are in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, a.signal_numbers())
        try:
            os.chdir(_START['cwd'])
            os.execve(sys.executable, argv, env)
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, a.signal_numbers())
            self.refused('exec of %s failed: %s' % (sys.executable,
                                                    e.strerror))
            for fd in keep:
                os.set_inheritable(fd, False)
            os.chdir(a.cfg.base_path)
            signal.set_wakeup_fd(a.wake_w)
            a.open_control()

    def adopt_workers(self, state):
        """After a USR2 re-exec: take over the old image's workers as
        generation 0, so manage_workers() replaces them like a reload."""
        a = self.arbiter
        a.started = time.monotonic() - (time.time() - state.started)
        a.num_workers = state.number_workers
        for entry in state.workers:
            # [pid, slot, booted]; an older image sent [pid, slot]
            pid, number = entry[0], entry[1]
            proc = self.adopted(pid, number,
                                entry[2] if len(entry) > 2 else True)
            slot = a.slots.get(number) or a.slots.setdefault(
                number, Slot(number))
            if slot.proc is None:
                slot.proc = proc
            else:
                slot.old.append(proc)
        for entry in state.stopping:
            # [pid, slot]; an older image sent the pid alone
            pid, number = entry if isinstance(entry, list) else (entry, 0)
            proc = self.adopted(pid, number, True)
            a.stop_worker(proc, 'stopping before the upgrade')
        a.ready = True
        log.info('upgraded in place: %d worker(s) of the old code adopted, '
                 'replacing them', len(a.procs))
        if _UPGRADE_PROBLEMS:
            why = '; '.join(_UPGRADE_PROBLEMS)
            del _UPGRADE_PROBLEMS[:]
            self.fall_back(why)

    def fall_back(self, why):
        """The new image met a problem after the exec (or cannot boot a
        worker): keep the adopted workers (they are the current generation
        again; a slot whose new worker failed gets its adopted one back),
        say why.  There is no old image to go back to: an adopted worker
        that exits later is replaced by the new image."""
        a = self.arbiter
        self.result, self.reason = 'failed', why
        a.generation = 0
        a.upgrade = None
        for slot in a.slots.values():
            a.reloader.restore_slot(slot)   # new workers that booted stay
        log.error('USR2 upgrade failed after the exec, the old workers keep '
                  'serving: %s', why)
        sd_notify('MAINPID=%d\nREADY=1\nSTATUS=%d workers (upgrade failed)'
                  % (a.pid, a.num_workers))

    def check_completed(self):
        """After a USR2 exec: done once no adopted worker (generation 0)
        is left; systemd learns the new MAINPID."""
        a = self.arbiter
        if not a.upgrade or a.stopping or any(
                p.generation == 0 for p in a.procs.values()):
            return
        a.upgrade = None
        self.result = 'done'
        log.info('upgrade complete: every worker runs the new code')
        sd_notify('MAINPID=%d\nREADY=1\nSTATUS=%d workers'
                  % (a.pid, a.num_workers))

    def adopted(self, pid, number, booted):
        """Record an old image's worker; one still in init() stays
        BOOTING (it serves nobody yet: manage_workers() replaces it)."""
        a = self.arbiter
        cell = a.board.alloc()
        a.board.set(cell, Scoreboard.PID, pid)
        a.board.set(cell, Scoreboard.STATE, Scoreboard.BOOTED if booted
                    else Scoreboard.BOOTING)
        proc = WorkerProcess(pid, number, cell, 0, _NO_OPTIONS, a.cfg)
        proc.state = State.RUNNING if booted else State.BOOTING
        a.procs[pid] = proc
        return proc


def upgrade_preflight(cfg, state):
    """In the preflight child of a USR2 (the new image, exec'd with the
    master's argv and flags): its start-up up to the point of no return,
    taking nothing over.  Raises ConfigError naming the first problem.

    This is the place where the new worker class is imported and checked
    for an upgrade: a child, so a failure (or SystemExit) at import
    costs the master nothing."""
    resolve_user_group(cfg.user, cfg.group)
    try:
        os.chdir(cfg.base_path)
    except OSError as e:
        raise ConfigError('%s base_path: cannot enter %s: %s' % (
            cfg.where(), cfg.base_path, e.strerror))
    try:
        LogFile(cfg.log_file, owner=log_owner(cfg)).close()
    except OSError as e:
        raise ConfigError('cannot open log_file %s: %s'
                          % (cfg.log_file, e.strerror or e))
    for fd in state.fds or ():
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError(0, 'not a socket')
        except OSError as e:
            raise ConfigError('listener fd %d cannot be handed over: %s'
                              % (fd, e.strerror))
    master_worker_class(cfg)   # with `user`: in a child, privileges dropped
    say('upgrade preflight ok: %s [%s]' % (cfg.path, cfg.section))
    return EXIT_OK


# -- the spare ------------------------------------------------------------------
#
# A dead or recycled worker's replacement used to wait for a fork of the
# master (~1 ms per 12 MB on this kind of machine, then ~1.5 ms of the
# child resetting signals and fds with cold caches).  The spare has done
# all that ahead of time: replacing a worker is one write to its pipe.  A
# new spare is forked at the end of a loop turn in which no worker is
# booting, off the critical path.  Everything a spare inherited must still
# hold when it is used, so it is discarded on reload (generation), log
# reopen, stop, standby and upgrade; one that dies on its own is re-forked
# with a backoff.

class Spare(object):
    """The Arbiter's pre-forked spare: fork it, hand it a slot, discard it.

    ``proc`` is the waiting SpareProcess (None when there is none),
    ``dead`` the discarded spares not reaped yet, ``failures`` the spares
    that died on their own in a row, ``next_at`` the monotonic time before
    which no new spare is forked (backoff after deaths)."""

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.proc = None
        self.dead = set()
        self.failures = 0
        self.next_at = 0.0

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    def owns(self, pid):
        """True when ``pid`` is the spare or a discarded one."""
        return (pid in self.dead or self.proc is not None and
                pid == self.proc.pid)

    def wanted(self):
        a = self.arbiter
        return (bool(a.cfg.spare_worker) and not a.stopping and
                a.active and a.wanted() > 0)

    def deadline(self, now):
        """When a spare is due after a backoff, or None."""
        if self.proc is None and self.next_at > now and self.wanted():
            return self.next_at
        return None

    def keep(self):
        """End of a loop turn: fork a spare if there is none (or a stale
        one); drop it when no worker could use it."""
        a = self.arbiter
        spare = self.proc
        if spare is not None and (spare.generation != a.generation or
                                  not self.wanted()):
            self.discard('stale' if self.wanted() else 'not needed')
            spare = None
        if (spare is not None or not self.wanted() or
                time.monotonic() < self.next_at):
            return
        if any(p.state == State.BOOTING for p in a.procs.values()):
            # Not now: a fork stalls the children that are starting (they
            # fault on the pages it write-protects; measured 1-4 ms).  Their
            # boot notes wake the master again.
            return
        r, w = os.pipe()
        # The slot it will serve is not known yet: a dump file if any
        # worker here can time out.
        dump_fd = open_dump_file() if self.may_time_out() else None
        try:
            a.birth.open_child_listeners()
            pid = os.fork()
        except (OSError, HaltServer) as e:
            a.birth.close_child_listeners()
            for fd in (r, w, dump_fd):
                if fd is not None:
                    os.close(fd)
            log.warning('cannot fork a spare: %s',
                        getattr(e, 'strerror', None) or e)
            self.next_at = time.monotonic() + 1.0
            return
        if pid == 0:
            self.child(r, w, dump_fd)
        a.birth.close_child_listeners()
        os.close(r)
        os.set_inheritable(w, False)
        self.proc = SpareProcess(pid, w, dump_fd, a.generation)
        log.debug('spare forked: pid %d', pid)

    def may_time_out(self):
        a = self.arbiter
        if a.templates:
            return any(t.options.get('timeout', a.cfg.timeout)
                       for t in a.templates)
        return bool(a.cfg.timeout)

    def hand_to(self, proc):
        """Give ``proc``'s slot and cell to the spare; its pid, or None
        (no usable spare: the caller forks)."""
        spare = self.proc
        if spare is None or spare.generation != self.arbiter.generation:
            return None
        self.proc = None
        keep_dump = bool(proc.timeout) and spare.dump_fd is not None
        try:
            os.write(spare.pipe_w, b'%d %d %d\n' % (proc.slot, proc.cell,
                                                    keep_dump))
        except OSError:   # it died and is not reaped yet: fork instead
            self.dead.add(spare.pid)
            self.arbiter.kill(spare.pid, signal.SIGKILL)
            keep_dump = False
            return None
        finally:
            os.close(spare.pipe_w)
            if not keep_dump and spare.dump_fd is not None:
                os.close(spare.dump_fd)
        proc.dump_fd = spare.dump_fd if keep_dump else None
        self.failures = 0
        return spare.pid

    def discard(self, why):
        spare, self.proc = self.proc, None
        if spare is None:
            return
        log.debug('spare %d discarded: %s', spare.pid, why)
        self.dead.add(spare.pid)
        self.arbiter.kill(spare.pid, signal.SIGKILL)
        os.close(spare.pipe_w)
        if spare.dump_fd is not None:
            os.close(spare.dump_fd)

    def reap_dead(self):
        """Wait for the discarded spares (KILLed: they go at once)."""
        for pid in list(self.dead):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self.dead.discard(pid)

    def exited(self, pid, status):
        if pid in self.dead:
            self.dead.discard(pid)
            return
        # It died on its own (OOM killer, someone's kill): fork another,
        # but never in a loop.
        self.discard('exited')
        self.dead.discard(pid)
        self.failures += 1
        delay = min(60.0, 0.5 * 2 ** min(self.failures - 1, 7))
        self.next_at = time.monotonic() + delay
        log.warning('spare process %d exited (%s); next spare in %gs',
                    pid, describe_status(status), delay)

    def close_in_child(self):
        """In a new child: the spare's pipe and dump file are not its own."""
        spare, self.proc = self.proc, None
        if spare is not None:
            os.close(spare.pipe_w)
            if spare.dump_fd is not None:
                os.close(spare.dump_fd)

    def child(self, r, w, dump_fd):
        """Child half of keep(): prepare, wait, become a worker."""
        a = self.arbiter

        def body():
            os.close(w)
            pdeath = a.birth.prepare('spare')
            # Until it is a worker it has nothing to finish: a stop signal
            # ends it quietly; the others must not stop or kill it (TTIN's
            # default stops a process).  A USR1 is kept for the worker it
            # becomes: one sent between the hand-over and the worker's own
            # handler must still reopen its log.
            for name in IGNORED_IN_CHILDREN:
                signal.signal(getattr(signal, 'SIG' + name), signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, _defer_usr1)
            for name in ('TERM', 'INT', 'QUIT'):
                signal.signal(getattr(signal, 'SIG' + name),
                              lambda *args: os._exit(0))
            a.birth.preload_worker_class()
            a.birth.warm_up()
            data = b''
            while not data.endswith(b'\n'):
                chunk = os.read(r, 64)
                if not chunk:   # discarded, or the master is gone
                    raise SystemExit(0)
                data += chunk
            os.close(r)
            number, cell, keep_dump = [int(x) for x in data.split()]
            if not keep_dump and dump_fd is not None:
                os.close(dump_fd)
            return a.birth.become_worker(number, cell,
                                         dump_fd if keep_dump else None, pdeath)
        child_main(body)


# -- a reaped worker ------------------------------------------------------------

class WorkerExit(object):
    """What a reaped worker left: its scoreboard cell (read before the
    cell is released) and its wait status, in the words the log uses."""

    def __init__(self, proc, status, board):
        cell = proc.cell
        self.booted = board.get(cell, Scoreboard.STATE) == Scoreboard.BOOTED
        self.reason = board.get(cell, Scoreboard.REASON)
        self.text = board.text(cell)
        self.requests = board.get(cell, Scoreboard.REQUESTS)
        self.up = time.monotonic() - (board.getf(cell, Scoreboard.BOOTED_AT)
                                      or proc.spawned)
        self.init_rss = board.getf(cell, Scoreboard.INIT_RSS)
        self.how = describe_status(status)
        self.signaled = os.WIFSIGNALED(status)   # killed from outside?
        self.name = 'worker %d (pid %d)' % (proc.slot, proc.pid)
        self.ok_exit = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        self.memory = (self.reason == Scoreboard.R_MEMORY or proc.stop_reason
                       in ('soft memory limit', 'hard memory limit'))


# -- stack dump files -------------------------------------------------------------

def open_dump_file():
    """An unlinked temp file for a worker's stack dump at timeout.

    faulthandler writes raw lines; the master reads them back at reap
    and logs them as one record, continuation lines prefixed.
    """
    try:
        fd, path = tempfile.mkstemp(prefix='processhandler-dump-')
        os.unlink(path)
        return fd
    except OSError:
        return None


def close_dump(proc):
    if proc.dump_fd is not None:
        os.close(proc.dump_fd)
        proc.dump_fd = None


def read_dump(proc):
    if proc.dump_fd is None:
        return ''
    try:
        return os.pread(proc.dump_fd, 65536, 0).decode(
            'utf-8', 'replace').rstrip()
    except OSError:
        return ''
    finally:
        close_dump(proc)


# -- the reload transaction ------------------------------------------------------

class Reload(object):
    """HUP: re-read config, check the new worker code, rolling replace.

    A transaction: everything that can fail (config, the worker code --
    checked in a child, ReloadCheck, watched by the loop --, the new log
    file) is tried before anything changes; a failure leaves the old
    config, code, log and workers as they were.  Until the new generation
    runs, ``rollback`` holds what to go back to when one of its workers
    cannot boot (roll_back).  ``state`` is status's master.reload: the
    last HUP's result, None (none yet) / checking / pending (until the new
    generation runs) / done / failed."""

    IMPORT_TIMEOUT = 30.0  # the import of the worker code, in a child

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.state = {'count': 0, 'result': None, 'reason': None,
                      'generation': None}
        self.rollback = None   # see transaction() and roll_back()

    def refuse(self, why):
        """A HUP that cannot run: `reload` waits for an outcome."""
        self.state['count'] += 1
        self.state.update(result='failed', generation=None, reason=why)

    def start(self):
        self.state['count'] += 1
        sd_notify('RELOADING=1\nMONOTONIC_USEC=%d' % monotonic_usec())
        check = self.arbiter.reload_check
        if check.pid is not None:
            log.info('HUP while the previous one checks the worker code: '
                     'checking again once it ends')
            check.again = True
            return
        self.begin()

    def begin(self):
        """Read the config; check the worker code in the background
        (ReloadCheck) or, with nothing to import, commit at once."""
        a = self.arbiter
        try:
            new = self.new_config()
        except ConfigError as e:
            return self.failed(str(e))
        if a.cfg.path is None or a.templates:
            return self.commit(new, None)
        self.state.update(result='checking', reason=None, generation=None)
        a.reload_check.start(new, self.IMPORT_TIMEOUT)

    def checked(self, problem):
        """The ReloadCheck's verdict: commit, fail, or check again."""
        a = self.arbiter
        new = a.reload_check.cfg
        if a.stopping:
            return self.done('failed', 'the master is stopping')
        if a.reload_check.again:
            return self.begin()
        if problem:
            return self.failed(problem.replace('\n', '; '))
        # Nothing of the new code is imported here (that would block the
        # loop): forget the old modules, the spare and the workers import
        # the new ones (after their privilege drop).
        forget_user_modules(new.base_path)
        self.commit(new, None, fresh=True)

    def failed(self, why):
        log.error('reload failed, still running the previous config and '
                  'code: %s', why)
        self.state['generation'] = None
        self.done('failed', why)

    def commit(self, new, worker_class, fresh=False):
        """Switch to ``new`` (``fresh``: the workers import the code)."""
        a = self.arbiter
        try:
            before = self.transaction()
            self.apply(new, worker_class)
        except HaltServer as e:
            return self.failed(e.reason)
        if fresh:
            a.worker_class = None
        self.rollback = before
        a.generation += 1
        a.metrics.reloaded()
        self.state.update(result='pending', reason=None,
                          generation=a.generation)
        for slot in a.slots.values():
            # The user changed something: try the new code/config now, not
            # when a backoff earned by the old one ends (up to 30 s).
            slot.backoff_until = 0.0
        log.info('reloaded: generation %d, %d worker(s); new workers start '
                 'before old ones stop', a.generation, a.num_workers)

    def new_config(self):
        """Return the new Config (the running one when there is no
        file); change nothing.  The worker code is checked by
        ReloadCheck, in a child: an import that calls os._exit(), hangs
        or takes seconds must not take or block the master."""
        a = self.arbiter
        if a.cfg.path is None:
            return a.cfg
        new = load_config(a.cfg.path, a.cfg.section,
                          ['%s=%s' % kv for kv in a.cfg.overrides])
        self.keep_restart_only(new)
        return new

    def transaction(self):
        """What a reload changes, to put it back (roll_back)."""
        a = self.arbiter
        return {'cfg': a.cfg, 'worker_class': a.worker_class,
                'num_workers': a.num_workers,
                'generation': a.generation,
                'log_file': a.logfile.path}

    def roll_back(self, why):
        """A worker of the pending reload cannot boot: the transaction
        failed.  The old config, code and generation become current again,
        so the old workers keep serving and are replaced from the old
        template when they exit (max_requests, a crash, a kill); workers
        of the new generation are stopped."""
        a = self.arbiter
        before, self.rollback = self.rollback, None
        if before['log_file'] != a.logfile.path:
            try:
                self.switch_log(before['log_file'])
            except HaltServer as e:
                log.error('rollback: %s; the log stays %s', e.reason,
                          a.logfile.path)
        if before['cfg'].umask != a.cfg.umask:
            os.umask(before['cfg'].umask)
        a.cfg = before['cfg']
        a.worker_class = before['worker_class']
        setup_logging(a.cfg, a.logfile)
        a.num_workers = before['num_workers']
        a.generation = before['generation']
        a.spare.discard('reload rolled back')
        for slot in a.slots.values():
            self.restore_slot(slot, 'reload rolled back')
            slot.failures = slot.early_deaths = 0
            slot.backoff_until = 0.0
        why = '%s; rolled back to generation %d' % (why, a.generation)
        if self.state['result'] != 'pending':   # else done() says it
            log.error('reload failed: %s', why)
        self.done('failed', why)

    def restore_slot(self, slot, why=None):
        """Make the slot's newest live worker of the current generation
        (or older) its worker again; with ``why``, stop newer ones."""
        a = self.arbiter
        if (why and slot.proc is not None and
                slot.proc.generation > a.generation):
            newer, slot.proc = slot.proc, None
            slot.old.append(newer)
            a.stop_worker(newer, why)
        live = [p for p in slot.old if p.state != State.STOPPING and
                p.generation <= a.generation]
        if slot.proc is None and live:
            slot.proc = live[-1]
            slot.old.remove(live[-1])

    def keep_restart_only(self, new):
        """Put the running values of the restart-only keys into ``new``
        before anything uses it: the validation child drops to ``user``
        from the running config (a HUP that removes ``user`` must not run
        worker code as root)."""
        cfg = self.arbiter.cfg
        for key in RESTART_ONLY:
            if getattr(new, key) != getattr(cfg, key):
                log.warning('%s changed: it takes effect on restart only',
                            key)
                setattr(new, key, getattr(cfg, key))

    def apply(self, new, worker_class):
        """Commit a reload; only switch_log() may fail, and first."""
        a = self.arbiter
        old = a.cfg
        if new.log_file != a.logfile.path:
            self.switch_log(new.log_file)
        if new.umask != old.umask:
            os.umask(new.umask)   # inherited by the workers forked next
            log.info('umask changed: %04o for new workers', new.umask)
        a.cfg = new
        if worker_class is not None:
            a.worker_class = worker_class
        setup_logging(new, a.logfile)
        if not a.templates:
            a.num_workers = new.number_workers

    def switch_log(self, path):
        """Log to ``path`` from now on; HaltServer, with the old log kept,
        when it cannot be opened (a folder, no folder, no permission)."""
        try:   # the checks of start and `check` (a block device, a FIFO)
            check_log_target(path)
        except ConfigError as e:
            raise HaltServer('cannot open %s' % e)
        logfile = self.arbiter.logfile
        old = logfile.path
        logfile.path = path
        try:
            logfile.reopen()
        except OSError as e:
            logfile.path = old
            raise HaltServer('cannot open log_file %s: %s'
                             % (path, e.strerror or e))

    def progress(self):
        """A pending reload is done once every wanted slot runs a worker
        of the new generation (a failed one too, when its retry made it).
        """
        a, r = self.arbiter, self.state
        if r['generation'] != a.generation or r['result'] == 'done':
            return
        if a.stopping:
            if r['result'] == 'pending':
                self.done('failed', 'the master is stopping')
            return
        for n in range(1, a.wanted() + 1):
            slot = a.slots.get(n)
            proc = slot and slot.proc
            if (proc is None or proc.generation != a.generation
                    or proc.state != State.RUNNING):
                return
        self.done('done', None)

    def done(self, result, why):
        """Record the outcome; tell systemd once (READY=1 ends RELOADING)."""
        was = self.state['result']
        self.state.update(result=result, reason=why)
        if result == 'done':
            self.rollback = None   # the new generation runs: no way back
        if result == 'failed' and was == 'pending':
            log.error('reload failed: %s; the previous workers keep serving',
                      why)
        if was != 'failed' or result == 'failed':
            sd_notify('READY=1\nSTATUS=%d workers%s' % (
                self.arbiter.num_workers, '' if result == 'done' else
                ' (reload failed)'))


# -- memory limits, systemd watchdog ---------------------------------------------

class MemoryWatch(object):
    """The master's side of the memory limits: every check_interval, the
    RSS of each worker that has a limit; over hard: KILL, over soft: a
    graceful stop (the worker also checks its own soft limit)."""

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.next_check = 0.0

    def wanted(self):
        return any(p.soft_limit or p.hard_limit
                   for p in self.arbiter.procs.values())

    def deadline(self):
        return self.next_check if self.wanted() else None

    def check(self):
        a = self.arbiter
        now = time.monotonic()
        if now < self.next_check or not self.wanted():
            return
        self.next_check = now + a.cfg.check_interval
        for proc in list(a.procs.values()):
            if (proc.state not in (State.RUNNING, State.STOPPING)
                    or proc.kill_at is None and proc.state == State.STOPPING):
                continue
            rss = rss_mb(proc.pid)
            if rss is not None:
                self.enforce(proc, rss)

    def enforce(self, proc, rss):
        a = self.arbiter
        if proc.over_limit('hard', rss):
            log.error('worker %d (pid %d) RSS %.1f MB is over '
                      'hard_memory_limit %g MB: KILL', proc.slot,
                      proc.pid, rss, proc.hard_limit)
            a.set_state(proc, State.STOPPING)
            proc.stop_reason = 'hard memory limit'
            proc.kill_at = None
            a.kill(proc.pid, signal.SIGKILL)
        elif proc.over_limit('soft', rss) and proc.state == State.RUNNING:
            log.warning('worker %d (pid %d) RSS %.1f MB is over '
                        'soft_memory_limit %g MB: asking it to exit',
                        proc.slot, proc.pid, rss, proc.soft_limit)
            a.stop_worker(proc, 'soft memory limit')


class Watchdog(object):
    """systemd's watchdog: WATCHDOG=1 at half of WATCHDOG_USEC, from the
    master loop itself: a master stuck anywhere stops feeding it and
    systemd restarts it.  ``interval`` 0: no watchdog asked for."""

    def __init__(self):
        self.interval = watchdog_interval()
        self.next = 0.0

    def deadline(self):
        return self.next if self.interval else None

    def feed(self):
        if not self.interval:
            return
        now = time.monotonic()
        if now >= self.next:
            sd_notify('WATCHDOG=1')
            self.next = now + self.interval


# -- the child side of a fork ----------------------------------------------------

class WorkerBirth(object):
    """What a child forked by the master (a worker, or the spare) does
    before its worker runs: reset the master's signals and descriptors,
    drop privileges, set the parent-death signal, import the worker code,
    build and run the worker.  Always ends in os._exit() (child_main).
    ``own_listeners``: with reuse_port, the next child's listeners."""

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.own_listeners = None

    # -- in the master, around the fork

    def open_child_listeners(self):
        """reuse_port: the listeners of the child about to be forked (a
        worker, or the spare), bound here by the master -- before any
        privilege drop, so ports below 1024 work with ``user`` -- but not
        listening: an idle spare must not take connections.  None when
        the listeners are shared.  Raises HaltServer (cannot bind)."""
        a = self.arbiter
        self.own_listeners = None
        if not (a.cfg.reuse_port and a.cfg.bind and a.sockets):
            return
        self.own_listeners = [create_listener(listener_name(s),
                                              reuse_port=True, listen=False)
                              for s in a.sockets]

    def close_child_listeners(self):
        """In the master, after the fork: they are the child's."""
        for sock in self.own_listeners or ():
            sock.close()
        self.own_listeners = None

    # -- in the child

    def worker_process(self, number, cell, dump_fd=None):
        """Child half of spawn_worker()."""
        def body():
            pdeath = self.prepare('worker %d' % number)
            return self.become_worker(number, cell, dump_fd, pdeath)
        child_main(body)

    def prepare(self, tag):
        """In a new child: every step of a worker's start that does not
        depend on its slot (a spare does these before it is needed)."""
        a = self.arbiter
        _process_tag[0] = tag
        signal.set_wakeup_fd(-1)
        # Ignored from the first step, not after the import: a `pkill -HUP
        # -f` (or TTIN's default stop) reaching a child still booting must
        # not kill or stop it.
        for name in a.SIGNALS:
            signal.signal(getattr(signal, 'SIG' + name),
                          signal.SIG_IGN if name in IGNORED_IN_CHILDREN
                          else signal.SIG_DFL)
        # USR1's default would kill a worker still importing or building
        # (a logrotate must never do that): noted until _init_signals.
        signal.signal(signal.SIGUSR1, _defer_usr1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
        self.close_master_fds()
        line_buffered_stdio()
        set_proc_title('%s: %s' % (a.cfg.proc_name, tag))
        drop_privileges(a.uid, a.gid)
        # Die with the master even if it is KILLed (supervisor #199).
        pdeath = prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != a.pid:
            raise SystemExit(WORKER_EXIT_ORPHANED)  # master died before prctl
        return pdeath

    def become_worker(self, number, cell, dump_fd, pdeath):
        """The slot-dependent rest of a worker's start; runs the worker and
        returns its exit status."""
        a = self.arbiter
        tag = 'worker %d' % number
        if _process_tag[0] != tag:   # a spare becoming this worker
            _process_tag[0] = tag
            set_proc_title('%s: %s' % (a.cfg.proc_name, tag))
        if a.cfg.cpu_affinity:
            pin_cpu(a.cfg.cpu_affinity, number)
        try:
            template = self.load_worker_code(number)
            sockets = self.worker_sockets()
            worker = template if template is not None else build_worker(
                a.worker_class, a.cfg, a.pid, sockets)
        except Exception as e:
            # Import or __init__ failed: a boot failure, like init().
            log.exception('worker %d cannot be built', number)
            a.board.set_text(cell, 'building the worker raised %s: %s'
                             % (type(e).__name__, e))
            return WORKER_EXIT_BOOT_ERROR
        worker._ph.accept_lock = None
        if a.accept_fd is not None:
            loop = WORKER_TYPES[worker.worker_type or a.cfg.worker_type]
            worker._ph.accept_lock = AcceptLock(
                a.accept_fd, threaded=loop.threaded,
                cooperative=loop.cooperative)
        worker._boot(a.cfg, number, a.board, cell, a.boot_w,
                     a.pid, sockets, a.logfile, pdeath, dump_fd)
        return worker._serve()

    def preload_worker_class(self):
        """In the spare, after the privilege drop: import the worker code
        while waiting, so becoming a worker only builds the object.  A
        failure is reported when it is used (worker_object)."""
        a = self.arbiter
        if not a.templates and a.worker_class is None:
            try:
                a.worker_class = load_worker_class(a.cfg)
            except BaseException:   # SystemExit at import too: said later
                pass

    def warm_up(self):
        """In the spare, while it waits: build and drop a plain Worker --
        processhandler's own class, no user code runs -- so that building
        the real one after the hand-over finds that code and the memory
        it touches warm.  A fresh child pays first-use page copies and
        cold caches: measured ~0.2 ms (PyPy) to ~0.3 ms (CPython) less
        from kill to the replacement's init()."""
        a = self.arbiter
        if a.templates:   # Manager mode: the worker objects exist already
            return
        count = Worker._counter[0]
        try:
            build_worker(Worker, a.cfg, a.pid, [])
        except Exception:
            pass    # only a warm-up: the spare serves without it
        Worker._counter[0] = count   # names as without a spare

    def load_worker_code(self, number):
        """In the worker process: make its worker code ready; return
        Manager mode's template (None in config mode: the class, imported
        here when the master did not -- ``user`` set -- is built by
        build_worker).  The loop class's prepare_child() first (gevent:
        monkey-patch, then import the worker code afresh: it was imported
        unpatched)."""
        a = self.arbiter
        template = a.template(number)
        if template is None and a.worker_class is None:
            a.worker_class = load_worker_class(a.cfg)
        wtype = ((template or a.worker_class).worker_type
                 or a.cfg.worker_type)
        fresh = WORKER_TYPES.get(wtype, SyncLoop).prepare_child()
        if fresh and template is None:
            forget_user_modules(a.cfg.base_path)
            a.worker_class = load_worker_class(a.cfg)
        return template

    def worker_sockets(self):
        """In a worker: the listeners it accepts on (its own with
        reuse_port: listen() needs no privilege, bind did)."""
        own = self.own_listeners
        if own is None:
            return list(self.arbiter.sockets)
        for sock in own:
            sock.listen(min(2048, socket.SOMAXCONN))
        for sock in self.arbiter.sockets:
            sock.close()
        return own

    def close_master_fds(self):
        a = self.arbiter
        try:
            a.selector.close()
        except Exception:
            pass
        for fd in a._pipes:
            if fd != a.boot_w:
                os.close(fd)
        if a.control is not None:
            a.control.close()
        for fd in (a.pidfile.fd, a.pidfile.lock_fd, a.ready_fd):
            if fd is not None:
                os.close(fd)
        a.pidfile.fd = a.pidfile.lock_fd = a.ready_fd = None
        for proc in a.procs.values():   # siblings' dump files
            close_dump(proc)
        a.spare.close_in_child()
        if getattr(a.leader, 'fd', None) is not None:
            os.close(a.leader.fd)
        a.metrics.close(child=True)
        if hasattr(a.leader, 'close_in_child'):
            a.leader.close_in_child()   # the master's Redis connection


def child_main(body):
    """Run a forked child's ``body``; always ends in os._exit() with
    the status it returns (never returns into the master's code)."""
    status = EXIT_FAILURE
    try:
        status = body()
    except SystemExit as e:
        status = (e.code if isinstance(e.code, int) else
                  (0 if e.code is None else 1))
    except BaseException:
        try:
            log.exception('%s crashed', _process_tag[0])
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def pin_cpu(cpu_affinity, number):
    """In worker ``number``: pin it to its CPUs of ``cpu_affinity``."""
    cpus = affinity_for_slot(cpu_affinity, number, get_affinity())
    if not cpus:
        return
    try:
        done = set_affinity(cpus)
    except (OSError, ValueError, OverflowError) as e:
        log.warning('cannot pin to CPU %s: %s', cpus,
                    getattr(e, 'strerror', None) or e)
        return
    if done:
        log.debug('pinned to CPU %s', cpus)
    else:   # the ctypes / psutil paths report failure, not raise
        log.warning('cannot pin to CPU %s: not permitted or no such '
                    'CPU', cpus)


def log_config_notes(cfg):
    """Say once what the config asks that will not do what it seems."""
    if privilege_notes(cfg)[1]:
        log.warning('%s', privilege_notes(cfg)[1])
    for line in unsafe_import_folders(cfg):
        log.warning('%s', line)
    for key, hint in cfg.unknown_keys():
        log.info('config key %r is not a setting: passed to the workers '
                 'as a string%s', key, "; did you mean '%s'?" % hint
                 if hint else '')
    if cfg.accept_lock and cfg.worker_type == 'asyncio':
        log.warning('accept_lock has no effect with worker_type = '
                    'asyncio (the event loop accepts)')
    if cfg.accept_lock and cfg.reuse_port:
        log.warning('accept_lock has no effect with reuse_port = true '
                    '(each worker has its own listener)')


class Arbiter(object):
    """The master: keeps ``number_workers`` worker processes alive.

    Lifecycle, in the order the methods below read:
    setup -> run loop (wait -> dispatch signals -> reap -> murder -> check
    memory -> manage -> ready) -> handle_<signal> -> scale / stop ->
    spawn / stop / kill / reap -> murder -> manage -> leaving -> status.
    It conducts; each responsibility with state of its own is a
    collaborator it owns (add_collaborators): WorkerBirth, Spare, Reload,
    Upgrade, Leadership, ControlServer, Metrics, MemoryWatch, Watchdog.

    The master runs no thread (a fork taken while another thread holds a
    lock -- the import lock on PyPy -- leaves the child blocked for ever).
    Signal handlers only queue the signal; set_wakeup_fd wakes select().
    """

    SIGNALS = ['HUP', 'QUIT', 'INT', 'TERM', 'TTIN', 'TTOU', 'USR1', 'USR2',
               'WINCH', 'CHLD']
    BACKOFF_BASE = 0.5     # first retry delay after a boot failure (s)
    BACKOFF_MAX = 30.0     # cap: keep retrying, never give up silently
    EARLY_DEATH = 1.0      # a crash this soon after boot may be a failure:
    EARLY_DEATHS = 3       # when it handled nothing, or this many in a row
    ORPHAN_GRACE = 2.0     # TERM -> KILL for adopted grandchildren at exit

    def __init__(self, cfg, worker_class=None, templates=None,
                 ready_fd=None, daemonized=False, title=None,
                 keep_user_logging=False, save_on_signal=False,
                 upgrade=None):
        """``worker_class``: the Worker subclass each worker process builds
        its own object of (config mode; None: the workers import
        ``cfg.worker_class`` themselves, after dropping privileges);
        ``templates``: Worker instances, slot i runs templates[i-1]
        (Manager mode: the user's own process made them)."""
        self.cfg = cfg
        self.worker_class = worker_class
        self.templates = list(templates or [])
        self.ready_fd = ready_fd
        self.daemonized = daemonized
        self.title = title
        self.keep_user_logging = keep_user_logging
        self.save_on_signal = save_on_signal
        self.upgrade = upgrade     # UpgradeState handed over by USR2
        self.run_once = False      # uliweb Manager(daemon=False): no restarts
        self.strict_boot = True    # a boot failure before ready halts
        self.halt_reason = None    # why run() failed (HaltServer), if it did
        self.num_workers = len(self.templates) or cfg.number_workers
        self.pid = os.getpid()
        self.slots = {}
        self.procs = {}
        self.generation = 1
        self.spawns = 0            # worker processes forked so far
        self.sig_queue = []
        self.stopping = False
        self.graceful = True
        self.ready = False
        self.started = time.monotonic()
        self.pidfile = None
        self.instance = 1
        self.logfile = None
        self.board = None
        self.selector = None
        self.sockets = []          # listeners shared by every worker
        self.accept_fd = None      # accept_lock's file
        self.uid = self.gid = None
        self._pipes = []
        self.handlers = {}         # signum -> handle_<name>
        self.later_logs = []       # worker_exited()'s lines, see flush_logs
        self.add_collaborators(upgrade)

    def add_collaborators(self, upgrade):
        """The parts this conductor owns, one responsibility each."""
        self.upgrader = Upgrade(self, upgrade)
        self.leadership = None     # Leadership, with leader_lock set
        self.control_server = ControlServer(self)
        self.spare = Spare(self)   # the pre-forked spare, see Spare
        self.reload_check = ReloadCheck(self)   # a HUP's code check
        self.metrics = Metrics(self)   # counters, /metrics, statsd, health
        self.reloader = Reload(self)
        self.reloads = self.reloader.state   # the last HUP, for status
        self.birth = WorkerBirth(self)   # the child side of each fork
        self.memory = MemoryWatch(self)
        self.watchdog = Watchdog()

    @property
    def control(self):
        """The control socket, or None (closed in children)."""
        return self.control_server.sock

    def open_control(self):
        self.control_server.open()

    def close_control(self):
        self.control_server.close()

    @property
    def leader(self):
        """The leader lock (FileLeader / RedisLeader), or None."""
        return self.leadership.lock if self.leadership else None

    @property
    def active(self):
        """False while on standby (the leader lock is held elsewhere)."""
        return self.leadership.active if self.leadership else True

    # -- setup ----------------------------------------------------------------

    def setup(self):
        cfg = self.cfg
        self.uid, self.gid = resolve_user_group(cfg.user, cfg.group)
        self.open_log()
        if not self.keep_user_logging:
            setup_logging(cfg, self.logfile)
        self.pidfile, self.instance = acquire_instance(cfg, self.upgrade)
        self.sockets, self.accept_fd = open_listeners(
            cfg, self.upgrade, (self.uid, self.gid))
        lock = make_leader(cfg)
        if lock is not None:
            self.leadership = Leadership(self, lock)
            held = self.upgrade.leader if self.upgrade else None
            if held:   # USR2: the lease is ours already, keep it
                lock.token = held['token']
                lock.expires = held['expires']
                lock.fd = held.get('fd')
                self.leadership.active = True
            elif isinstance(lock, FileLeader):
                lock.check()
            self.leadership.tend()
        if not prctl(PR_SET_CHILD_SUBREAPER, 1):
            log.info('not a child subreaper on this platform: orphaned '
                     'grandchildren go to init')
        set_proc_title('%s: master' % cfg.proc_name)
        self.board = Scoreboard()
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = self.make_pipe()
        self.boot_r, self.boot_w = self.make_pipe()
        self.selector.register(self.wake_r, selectors.EVENT_READ,
                               self.drain_pipe)
        self.selector.register(self.boot_r, selectors.EVENT_READ,
                               self.drain_pipe)
        try:
            self.open_control()
        except HaltServer as h:
            if not self.upgrade:
                raise
            # After a USR2 exec: serving beats being controllable.
            _UPGRADE_PROBLEMS.append(h.reason)
        self.metrics.open()
        self.init_signals()
        log_config_notes(cfg)
        settle_memory()
        log.info('processhandler %s starting: master pid %d, %d %s '
                 'worker(s), config %s [%s]%s', __version__, self.pid,
                 self.num_workers, cfg.worker_type, cfg.path or '-',
                 cfg.section, ' instance %d' % self.instance
                 if self.instance > 1 else '')

    def open_log(self):
        cfg = self.cfg
        try:
            self.logfile = LogFile(cfg.log_file,
                                   redirect_stdio=self.daemonized,
                                   owner=(self.uid, self.gid)
                                   if self.uid is not None else None)
        except OSError as e:   # a folder, a missing folder, no permission
            why = 'cannot open log_file %s: %s' % (cfg.log_file,
                                                   e.strerror or e)
            if not self.upgrade:
                raise HaltServer(why)
            # After a USR2 exec the old image's log is still our stderr.
            _UPGRADE_PROBLEMS.append(why + ' (logging to stderr)')
            self.logfile = LogFile(None)

    def make_pipe(self):
        r, w = os.pipe()
        for fd in (r, w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self._pipes.extend((r, w))
        return r, w

    def signal_numbers(self):
        return [getattr(signal, 'SIG' + name) for name in self.SIGNALS]

    def init_signals(self):
        self.handlers = dict(
            (getattr(signal, 'SIG' + name),
             getattr(self, 'handle_' + name.lower()))
            for name in self.SIGNALS)
        for signum in self.signal_numbers():
            signal.signal(signum, self.signal_handler)
            # Restart interrupted system calls rather than seeing EINTR;
            # the wakeup fd still wakes select().
            signal.siginterrupt(signum, False)
        signal.set_wakeup_fd(self.wake_w)
        # After a USR2 re-exec they arrive blocked (see Upgrade.reexec()): the ones
        # sent meanwhile are delivered now, to the handlers.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signal_numbers())

    def signal_handler(self, signum, frame):
        # Only record: logging or waitpid here can deadlock (gunicorn #3441).
        if len(self.sig_queue) < 10000:
            self.sig_queue.append(signum)

    # -- the loop -------------------------------------------------------------

    def run(self):
        """Run the master until it stops; return its exit status."""
        status = EXIT_OK
        try:
            self.setup()
            if self.upgrade:
                self.upgrader.adopt_workers(self.upgrade)
            self.manage_workers()
            self.loop()
        except HaltServer as h:
            status = h.exit_status
            if self.logfile is not None and self.logfile.path:
                log.error('%s', h.reason)
            self.halt_reason = h.reason
            self.kill_all_now()
        finally:
            self.cleanup()
        if status != EXIT_OK:
            # Only now, with the workers reaped and the pidfile gone: a
            # failed `start -d` returns to a clean slate.
            self.ready_fd = report_to_launcher(self.ready_fd, 'error',
                                               self.halt_reason)
        if status == EXIT_OK:
            log.info('master %d exiting', self.pid)
        return status

    def loop(self):
        while True:
            self.wait_for_events(self.next_deadline())
            self.dispatch_signals()
            self.reap_workers()
            if self.stopping and not self.procs and not self.spare.dead:
                self.flush_logs()
                return
            self.murder_workers()
            self.memory.check()
            if self.leadership is not None:
                self.leadership.tend()
            self.manage_workers()
            self.flush_logs()
            self.check_ready()
            self.reloader.progress()
            self.watchdog.feed()
            self.spare.keep()
            self.metrics.tick()
            self.upgrader.check_deadline()
            self.reload_check.check_deadline()

    def next_deadline(self):
        """Seconds until the nearest thing to do, None if only events."""
        if self.sig_queue:
            return 0
        now = time.monotonic()
        deadlines = []
        for proc in self.procs.values():
            if proc.kill_at is not None:
                deadlines.append(proc.kill_at)
            elif proc.boot_timeout and proc.state == State.BOOTING:
                deadlines.append(proc.spawned + proc.boot_timeout)
            elif proc.timeout and proc.state == State.RUNNING:
                started = self.board.getf(proc.cell, Scoreboard.RUN_STARTED)
                # An idle worker may start a run right after we look: the
                # earliest it could time out is now + timeout.
                deadlines.append((started or now) + proc.timeout)
        for slot in self.slots.values():
            if slot.proc is None and slot.backoff_until > now:
                deadlines.append(slot.backoff_until)
        if self.spare.deadline(now) is not None:
            deadlines.append(self.spare.deadline(now))
        deadlines.append(self.memory.deadline())
        deadlines.append(self.watchdog.deadline())
        if self.leadership is not None:
            deadlines.extend(self.leadership.deadlines())
        deadlines.append(self.metrics.due())
        if self.upgrader.deadline is not None:
            deadlines.append(self.upgrader.deadline)
        deadlines.append(self.reload_check.deadline)
        deadlines = [d for d in deadlines
                     if d is not None and d != float('inf')]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def wait_for_events(self, timeout):
        try:
            events = self.selector.select(timeout)
        except InterruptedError:
            return
        for key, mask in events:
            key.data(key.fileobj)

    def drain_pipe(self, fd):
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass

    def dispatch_signals(self):
        while self.sig_queue:
            handler = self.handlers.get(self.sig_queue.pop(0))
            if handler is not None:
                handler()

    def check_ready(self):
        self.upgrader.check_completed()
        if self.ready or self.stopping:
            return
        for n in range(1, self.wanted() + 1):
            slot = self.slots.get(n)
            if slot is not None and slot.finished:
                continue
            if (slot is None or slot.proc is None or
                    slot.proc.state != State.RUNNING):
                return
        self.ready = True
        msg = 'pid %d, %d worker(s) running' % (self.pid, self.wanted())
        if not self.active:
            msg = 'pid %d, standby (the leader lock %s is held elsewhere)' % (
                self.pid, self.leader.describe())
        log.info('ready: %s', msg)
        self.ready_fd = report_to_launcher(self.ready_fd, 'ready', msg)
        sd_notify('READY=1\nSTATUS=%d workers\nMAINPID=%d'
                  % (self.num_workers, self.pid))

    # -- signal handlers --------------------------------------------------------

    def handle_chld(self):
        """A child exited: reap_workers() runs right after, every turn."""

    def handle_hup(self):
        """Reload config and worker code; replace workers, keep capacity."""
        if not self.stopping:
            self.reloader.start()
        else:
            self.reloader.refuse('the master is stopping')

    def handle_term(self):
        """Graceful stop: workers finish their run; KILL after the grace."""
        self.begin_stop(graceful=True)

    def handle_int(self):
        """Ctrl-C: the first a graceful stop (current jobs finish, as in
        celery and rq), a second one -- or one during a stop -- quick."""
        if self.stopping:
            return self.handle_quit()
        self.begin_stop(graceful=True)
        self.tell_terminal('stopping gracefully; Ctrl-C again to quit at once')

    def tell_terminal(self, msg):
        log.info(msg)
        if not self.daemonized and self.logfile and self.logfile.fd != 2:
            try:       # the log is elsewhere: the person at the terminal
                os.write(2, ('processhandler: %s\n' % msg).encode())
            except OSError:
                pass

    def handle_quit(self):
        """Quick stop."""
        self.begin_stop(graceful=False)

    def handle_ttin(self):
        """One more worker (saved to the config with `start --save`)."""
        if self.num_workers >= MAX_WORKERS:
            log.warning('TTIN ignored: %d worker(s) is the maximum',
                        MAX_WORKERS)
            return
        self.set_num_workers(self.num_workers + 1, 'TTIN')
        self.save_num_workers()

    def handle_ttou(self):
        """One fewer worker, never fewer than one."""
        self.set_num_workers(max(1, self.num_workers - 1), 'TTOU')
        self.save_num_workers()

    def handle_usr1(self):
        """Reopen log files (logrotate), here and in every worker."""
        try:
            self.logfile.reopen()
        except OSError as e:
            log.error('cannot reopen log file %s: %s', self.logfile.path,
                      e.strerror)
        log.info('log file reopened')
        self.spare.discard('log file reopened')   # it holds the old file
        for proc in list(self.procs.values()):
            self.kill(proc.pid, signal.SIGUSR1)

    def handle_usr2(self):
        """Re-exec the master in place (new code), keeping pid, pidfile,
        lock and listening sockets; old workers drain gracefully."""
        if not self.stopping:
            self.upgrader.start()

    def handle_winch(self):
        """Stop all workers, keep the master (daemon only)."""
        if not self.daemonized:
            log.info('WINCH ignored: not daemonized (terminal resize)')
            return
        log.info('WINCH: stopping all workers; the master stays (TTIN or '
                 'HUP brings them back)')
        self.set_num_workers(0, 'WINCH')

    # -- scale, stop ---------------------------------------------------------

    def set_num_workers(self, n, why):
        if self.stopping:
            return self.num_workers
        if n != self.num_workers:
            log.info('%s: %d -> %d worker(s)', why, self.num_workers, n)
            self.num_workers = n
            sd_notify('STATUS=%d workers' % n)
        return n

    def save_num_workers(self):
        """`start --save`: TTIN/TTOU also rewrite number_workers in place."""
        if not self.save_on_signal or not self.cfg.path or self.stopping:
            return
        try:
            save_number_workers(self.cfg.path, self.cfg.section,
                                self.num_workers)
            log.info('saved number_workers = %d in %s', self.num_workers,
                     self.cfg.path)
        except (OSError, ValueError) as e:
            log.error('cannot save number_workers to %s: %s (the running '
                      'count is %d)', self.cfg.path,
                      getattr(e, 'strerror', None) or e, self.num_workers)

    def begin_stop(self, graceful):
        if self.stopping and (graceful or not self.graceful):
            return
        self.stopping, self.graceful = True, graceful
        log.info('%s stop: %d worker(s) to stop', 'graceful' if graceful
                 else 'quick', len(self.procs))
        sd_notify('STOPPING=1')
        self.spare.discard('master stopping')
        self.reload_check.cancel()
        for proc in list(self.procs.values()):
            self.stop_worker(proc, 'master stopping', graceful=graceful)

    def kill_all_now(self):
        """Startup failed or halted: KILL every worker and reap them."""
        self.spare.discard('halted')
        self.spare.reap_dead()
        for proc in list(self.procs.values()):
            self.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.procs and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            proc = self.procs.pop(pid, None)
            if proc is not None:
                self.board.release(proc.cell)

    # -- spawn, stop, kill, reap ----------------------------------------------

    def set_state(self, proc, state):
        if proc.state != state:
            log.debug('worker %d (pid %d): %s -> %s', proc.slot, proc.pid,
                      State.NAMES[proc.state], State.NAMES[state])
            proc.state = state

    def template(self, number):
        """Manager mode: the Worker instance slot ``number`` runs, or None
        (config mode: each worker process builds its own, see
        build_worker)."""
        if self.templates:
            return self.templates[(number - 1) % len(self.templates)]
        return None

    def spawn_worker(self, slot):
        try:
            cell = self.board.alloc()
        except Exception as e:
            log.exception('cannot create worker %d', slot.number)
            return self.slot_failed(slot, '%s: %s' % (type(e).__name__, e))
        template = self.template(slot.number)
        proc = WorkerProcess(0, slot.number, cell, self.generation,
                             template.options if template else _NO_OPTIONS,
                             self.cfg)
        proc.reached = getattr(template, 'reached_memory_limit', None)
        pid = self.spare.hand_to(proc)
        if pid is None:
            if proc.timeout:
                proc.dump_fd = open_dump_file()
            try:
                self.birth.open_child_listeners()
                pid = fork_deferring_usr1()
            except (OSError, HaltServer) as e:
                self.birth.close_child_listeners()
                self.board.release(cell)
                close_dump(proc)
                return self.slot_failed(slot, 'fork failed: %s' % e.strerror
                                        if isinstance(e, OSError) else e.reason)
            if pid == 0:
                self.birth.worker_process(slot.number, cell, proc.dump_fd)
            self.birth.close_child_listeners()
        proc.pid = pid
        self.procs[pid] = proc
        slot.proc = proc
        self.spawns += 1
        log.debug('worker %d spawned: pid %d (generation %d)', slot.number,
                  pid, self.generation)

    def slot_failed(self, slot, why, verdict=False):
        """A boot failure or an early death: back off, exponentially.
        ``verdict``: the worker's code itself cannot boot (not a kill from
        outside, a failed fork): a pending reload rolls back, an upgrade
        falls back to the adopted workers."""
        self.metrics.slot_failed(slot)
        slot.failures += 1
        delay = min(self.BACKOFF_MAX,
                    self.BACKOFF_BASE * 2 ** min(slot.failures - 1, 16))
        slot.backoff_until = time.monotonic() + delay
        if not self.ready and not self.stopping and self.strict_boot:
            raise HaltServer('worker %d failed to boot: %s'
                             % (slot.number, why))
        # Loud the first time (or when the reason changes), then quieter:
        # a slot failing for hours must not flood the log.
        level = (logging.ERROR if why != slot.last_error or
                 slot.failures == 1 else logging.INFO)
        slot.last_error = why
        log.log(level, 'worker %d failed (%s); attempt %d in %.1fs',
                slot.number, why, slot.failures + 1, delay)
        reloader = self.reloader
        if reloader.rollback and verdict:   # a reload's code cannot boot
            reloader.roll_back('worker %d: %s' % (slot.number, why))
        elif self.reloads['result'] == 'pending':
            reloader.done('failed', 'worker %d: %s' % (slot.number, why))
        elif self.upgrade and not verdict:
            pass   # retried with backoff; the adopted worker keeps serving
        elif self.upgrade:
            self.upgrader.fall_back('worker %d of the new image: %s'
                                    % (slot.number, why))
        else:   # after a failed upgrade: the adopted worker keeps its slot
            reloader.restore_slot(slot)

    def stop_worker(self, proc, why, graceful=True):
        """Ask one worker to stop: TERM (graceful) or QUIT (quick)."""
        if proc.state == State.STOPPING and (graceful or proc.kill_at is None):
            return
        self.set_state(proc, State.STOPPING)
        proc.stop_reason = why
        proc.stop_requested = time.monotonic()
        proc.kill_at = proc.stop_requested + proc.graceful_timeout
        log.debug('stopping worker %d (pid %d): %s', proc.slot, proc.pid, why)
        self.kill(proc.pid, signal.SIGTERM if graceful else signal.SIGQUIT)

    def kill(self, pid, sig):
        kill_quietly(pid, sig)

    def reap_workers(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            proc = self.procs.pop(pid, None)
            if proc is None and self.spare.owns(pid):
                self.spare.exited(pid, status)
                continue
            if proc is None and self.upgrader.owns(pid):
                self.upgrader.preflight_exited(status)
                continue
            if proc is None and self.reload_check.owns(pid):
                self.reloader.checked(self.reload_check.exited(status))
                continue
            if proc is None:
                # An orphaned grandchild that came to us (we are a child
                # subreaper): reaped quietly, so no zombie stays.
                log.debug('reaped adopted process %d (%s)', pid,
                          describe_status(status))
                continue
            self.worker_exited(proc, status)

    def worker_exited(self, proc, status):
        """Account for a reaped worker: log why, back off if it failed.

        The lines for the usual cases wait in later_logs until the loop
        has started the replacement: formatting and writing a record is
        the slowest thing here (a cold master takes ~0.3 ms for one)."""
        was = proc.state
        ex = WorkerExit(proc, status, self.board)
        self.metrics.worker_exited(proc, status)
        slot = self.release_proc(proc)
        replace = (slot is not None and slot.proc is None
                   and not self.stopping and proc.slot <= self.wanted())
        if proc.timed_out or proc.boot_timed_out:
            self.log_timeout_exit(proc, ex)
        elif was == State.STOPPING and not (ex.memory and replace):
            self.later(log.info, '%s stopped (%s): %s', ex.name,
                       proc.stop_reason, ex.how)
            return
        if not replace:
            return   # an older generation, a retired slot, or shutting down
        if self.slot_finished(slot, status, ex.name, ex.how):
            return
        self.judge_exit(slot, proc, ex)
        if slot.proc is None and slot.backoff_until <= time.monotonic():
            # Replace it now rather than at the end of the loop turn: this
            # is the respawn latency users see.
            self.spawn_worker(slot)

    def release_proc(self, proc):
        """Free a reaped worker's cell and dump file, forget it in its
        slot (dropping a retired, empty slot); return the slot or None."""
        self.board.release(proc.cell)
        if not (proc.timed_out or proc.boot_timed_out):
            close_dump(proc)
        self.set_state(proc, State.EXITED)
        slot = self.slots.get(proc.slot)
        if slot is not None:
            slot.forget(proc)
            if proc.slot > self.wanted() and not slot.procs():
                del self.slots[proc.slot]
        return slot

    def log_timeout_exit(self, proc, ex):
        """A worker killed for its timeout or boot_timeout: its stack."""
        dump = read_dump(proc)
        if proc.timed_out:
            self.later(log.error, '%s killed after timeout (%s); its stack '
                       'at the timeout:\n%s', ex.name, ex.how, dump or
                       '(no stack: it did not answer the dump signal)')
            return
        if dump:
            self.later(log.error, '%s stack when its boot timed out:\n%s',
                       ex.name, dump)
        ex.booted = False
        ex.text = 'did not boot within %gs (boot_timeout; %s)' % (
            proc.boot_timeout, ex.how)

    def judge_exit(self, slot, proc, ex):
        """A replaced slot's worker exited: a failure (backoff), a
        recycle (limits, uliweb's is_exit), or a crash of a working one."""
        if not ex.booted:
            # Its own verdict (init() raised, a boot timeout, an exit): the
            # new code cannot boot.  Killed by a signal from outside: maybe
            # not its fault, retried with backoff.
            why = ex.text or 'died while booting (%s)' % ex.how
            self.slot_failed(slot, why,
                             verdict=bool(ex.text) or not ex.signaled)
        elif ex.memory and (ex.requests == 0 or ex.init_rss > (
                proc.soft_limit or proc.hard_limit or float('inf'))):
            # Over the limit before doing anything: recycling it after
            # every run would be a loop (celery #4125).  Back off instead.
            # (A stable reason: slot_failed logs a repeat quietly.)
            self.slot_failed(slot, 'over its memory limit (%g MB) right '
                             'after init()' % (proc.soft_limit or
                                               proc.hard_limit), verdict=True)
        elif ex.memory or (ex.ok_exit and ex.reason):
            self.later(log.info, '%s exited after %d requests: %s', ex.name,
                       ex.requests, proc.stop_reason
                       if ex.memory and proc.stop_reason else
                       Scoreboard.R_NAMES.get(ex.reason,
                                              'reason %d' % ex.reason))
            slot.failures = slot.early_deaths = 0
        elif proc.timed_out or ex.up >= self.EARLY_DEATH:
            if not proc.timed_out:
                self.later(log.error, '%s died after %.1fs: %s', ex.name,
                           ex.up, ex.how)
            slot.failures = slot.early_deaths = 0
        else:
            self.early_death(slot, ex.name, ex.up, ex.how, ex.requests)

    def early_death(self, slot, name, up, how, requests):
        """A worker died soon after its boot.  One that handled nothing
        cannot get going (a crash loop): back off.  One that was working
        was killed or crashed on a job: replace it at once, unless that
        happens EARLY_DEATHS times in a row."""
        slot.early_deaths += 1
        if requests and slot.early_deaths < self.EARLY_DEATHS:
            self.later(log.error, '%s died %.2fs after boot, after %d '
                       'request(s): %s', name, up, requests, how)
            return
        self.slot_failed(slot, 'died %.2fs after boot: %s%s' % (
            up, how, '; %d early deaths in a row' % slot.early_deaths
            if requests else ''))

    def slot_finished(self, slot, status, name, how):
        """True when the slot's worker is done for good: uliweb's
        ``is_exit = 'quit'`` (exit status WORKER_EXIT_FINISHED), or any
        exit under Manager(daemon=False), which starts each worker once.
        When every slot is done, the master stops."""
        quit = (os.WIFEXITED(status) and
                os.WEXITSTATUS(status) == WORKER_EXIT_FINISHED)
        if not (quit or self.run_once):
            return False
        slot.finished = True
        self.later(log.info, '%s finished (%s): not restarted', name,
                   "is_exit = 'quit'" if quit else how)
        if all(s.finished for s in self.slots.values()):
            self.later(log.info, 'every worker has finished')
            self.begin_stop(True)
        return True

    def later(self, fn, *args):
        self.later_logs.append((fn, args))

    def flush_logs(self):
        while self.later_logs:
            fn, args = self.later_logs.pop(0)
            fn(*args)

    def murder_workers(self):
        """KILL workers past their grace; dump and kill timed-out ones."""
        now = time.monotonic()
        for proc in list(self.procs.values()):
            if proc.kill_at is not None:
                if now >= proc.kill_at:
                    why = (proc.stop_reason if proc.timed_out else
                           '%s; graceful_timeout %gs' % (
                               proc.stop_reason, proc.graceful_timeout))
                    log.warning('worker %d (pid %d) still alive %.1fs '
                                'after being asked to stop (%s): KILL',
                                proc.slot, proc.pid,
                                now - (proc.stop_requested or now), why)
                    proc.kill_at = None
                    self.kill(proc.pid, signal.SIGKILL)
            elif (proc.state == State.BOOTING and proc.boot_timeout and
                    now - proc.spawned > proc.boot_timeout and
                    self.board.get(proc.cell, Scoreboard.STATE) !=
                    Scoreboard.BOOTED):
                self.boot_timeout_worker(proc, now - proc.spawned)
            elif proc.timeout and proc.state == State.RUNNING:
                started = self.board.getf(proc.cell, Scoreboard.RUN_STARTED)
                if started and now - started > proc.timeout:
                    self.timeout_worker(proc, now - started)

    def timeout_worker(self, proc, took):
        log.error('worker %d (pid %d) timed out: run() has taken %.2fs '
                  '(timeout %gs); dumping its stack, then killing it',
                  proc.slot, proc.pid, took, proc.timeout)
        proc.timed_out = True
        self.set_state(proc, State.STOPPING)
        proc.stop_reason = 'timeout'
        # faulthandler in the worker dumps every thread and re-raises the
        # signal (default action: terminate); KILL is the fallback.
        proc.kill_at = time.monotonic() + 1.0
        self.kill(proc.pid, DUMP_SIGNAL)

    def boot_timeout_worker(self, proc, took):
        """A worker whose start (import, __init__, init()) hangs: a boot
        failure.  Its stack is dumped when it has a dump file (timeout
        set) and faulthandler is armed by then; KILL is the fallback."""
        log.error('worker %d (pid %d) has not booted after %.2fs '
                  '(boot_timeout %gs): killing it', proc.slot, proc.pid,
                  took, proc.boot_timeout)
        proc.boot_timed_out = True
        self.set_state(proc, State.STOPPING)
        proc.stop_reason = 'boot timeout'
        proc.kill_at = time.monotonic() + 1.0
        self.kill(proc.pid, DUMP_SIGNAL if proc.dump_fd is not None
                  else signal.SIGKILL)

    def manage_workers(self):
        """Spawn missing slots, finish rolling replaces, retire surplus."""
        if self.stopping:
            return
        now = time.monotonic()
        self.update_booted()
        wanted = self.wanted()
        for n in range(1, wanted + 1):
            slot = self.slots.get(n)
            if slot is None:
                slot = self.slots[n] = Slot(n)
            if slot.finished:
                continue
            proc = slot.proc
            if (proc is not None and proc.generation < self.generation and
                    proc.state != State.STOPPING):
                # Rolling replace: the old one serves until the new is up.
                # One still booting serves nobody: stop it now, or a storm
                # of HUPs would pile up a generation per signal.
                slot.old.append(proc)
                slot.proc = None
                if proc.state == State.BOOTING:
                    self.stop_worker(proc, 'superseded before it booted')
                proc = None
            if proc is None and slot.backoff_until <= now:
                self.spawn_worker(slot)
            elif proc is not None and proc.state == State.RUNNING:
                for old in slot.old:
                    self.stop_worker(old, 'replaced by pid %d' % proc.pid)
        for n in sorted(self.slots):
            if n > wanted:
                self.retire_slot(self.slots[n])

    def wanted(self):
        """Workers to keep: number_workers when active, 0 on standby."""
        return self.num_workers if self.active else 0

    def update_booted(self):
        """BOOTING -> RUNNING for workers whose init() returned."""
        for proc in self.procs.values():
            if proc.state == State.BOOTING and self.board.get(
                    proc.cell, Scoreboard.STATE) == Scoreboard.BOOTED:
                self.set_state(proc, State.RUNNING)

    def retire_slot(self, slot):
        for proc in slot.procs():
            self.stop_worker(proc, 'fewer workers wanted')
        if not slot.procs():
            del self.slots[slot.number]

    # -- leaving ----------------------------------------------------------------

    def cleanup(self):
        if self.leader is not None and self.active and not self.procs:
            # The standby takes over at once.  Compare-and-delete: a key
            # someone else holds now is left alone.
            done = self.leader.release()
            if done:
                log.info('leader lock released')
            elif done is None:
                log.warning('leader lock not released (unreachable): it '
                            'expires by itself')
            else:
                log.warning('leader lock not released: it is held by %s '
                            'now, left alone', self.leader.holder())
        if self.board is not None and self.pidfile is not None:
            try:
                stop_orphans(self.procs, self.ORPHAN_GRACE)
            except OSError:
                pass
        self.close_control()
        self.metrics.close()
        for sock in self.sockets:
            name = listener_name(sock)
            sock.close()
            if name.startswith('unix:'):
                try:
                    os.unlink(name[5:])
                except OSError:
                    pass
        if self.pidfile is not None:
            self.pidfile.release()
        signal.set_wakeup_fd(-1)

    # -- status -----------------------------------------------------------------

    def status(self):
        """The `status --json` document."""
        now = time.monotonic()
        return {'master': self.master_status(now),
                'workers': self.worker_rows(now)}

    def master_status(self, now):
        cfg = self.cfg
        master = {'pid': self.pid, 'proc_name': cfg.proc_name,
                  'state': 'active' if self.active else 'standby',
                  'uptime': round(now - self.started, 3),
                  'config': cfg.path, 'section': cfg.section,
                  'instance': self.instance, 'version': __version__,
                  'number_workers': self.num_workers,
                  'worker_type': cfg.worker_type,
                  'generation': self.generation, 'ready': self.ready,
                  'spawns': self.spawns,
                  'spare': self.spare.pid,
                  'stopping': self.stopping,
                  'daemonized': self.daemonized,
                  'pidfile': self.pidfile.path,
                  'listeners': [listener_name(s) for s in self.sockets],
                  'reload': dict(self.reloads),
                  'upgrade': self.upgrader.report()}
        if self.logfile is not None:
            master['log'] = dict(self.logfile.write_errors(),
                                 path=self.logfile.path)
        if self.leader is not None:
            master['leader'] = {'lock': self.leader.describe(),
                                'holder': self.leader.holder(),
                                'token': self.leader.token}
            if self.active and self.leader.expires != float('inf'):
                master['leader']['lease_left'] = round(
                    self.leader.expires - now, 3)
        return master

    def worker_rows(self, now):
        rows = []
        for slot in sorted(self.slots.values(), key=lambda s: s.number):
            for proc in slot.procs():
                rows.append(self.proc_row(proc, now))
            if slot.proc is None:
                state = (State.BACKOFF if slot.backoff_until > now
                         else State.STOPPED)
                row = {'slot': slot.number, 'pid': None,
                       'state': State.NAMES[state], 'requests': 0,
                       'rss_mb': None,
                       'age': None, 'failures': slot.failures,
                       'generation': None,     # no process, no generation
                       'last_error': slot.last_error}
                if slot.backoff_until > now:
                    row['next_attempt_in'] = round(slot.backoff_until - now,
                                                   3)
                    row['waiting'] = ('backoff after %d failure(s) in a '
                                      'row' % slot.failures)
                rows.append(row)
        known = set(id(p) for s in self.slots.values() for p in s.procs())
        for proc in self.procs.values():
            if id(proc) not in known:
                rows.append(self.proc_row(proc, now))
        rows.sort(key=lambda r: (r['slot'], r['pid'] or 0))
        return rows

    def proc_row(self, proc, now):
        b = self.board
        rss = rss_mb(proc.pid)
        started = b.getf(proc.cell, Scoreboard.RUN_STARTED)
        row = {'slot': proc.slot, 'pid': proc.pid,
               'state': State.NAMES[proc.state],
               'requests': b.get(proc.cell, Scoreboard.REQUESTS),
               'rss_mb': round(rss, 1) if rss is not None else None,
               'age': round(now - proc.spawned, 3),
               'generation': proc.generation}
        if started:
            row['busy_for'] = round(now - started, 3)
        slot = self.slots.get(proc.slot)
        if slot is not None:
            row['failures'] = slot.failures
        return row


###############################################################################
# Manager (uliweb style) ######################################################
###############################################################################

class Manager(object):
    """Programmatic front end: run these Worker instances in the foreground.

        workers = [MyWork(max_requests=2), NewWorker(timeout=5, ...)]
        Manager(workers, check_point=1).start()

    Slot i runs ``workers[i-1]``; each instance's options (max_requests,
    timeout, memory limits...) apply to its slot.  ``check_point`` is how
    often memory is checked, ``wait_time`` the grace after TERM, ``title``
    the process title; any config key may be given as a keyword
    (``daemonize=True`` detaches).  ``daemon`` is uliweb's flag: True means
    supervise in the foreground, which this Manager always does (see
    UliwebManager for uliweb's daemon=False).
    """

    def __init__(self, workers, log=None, check_point=10,
                 title='Workers Daemon', wait_time=3, daemon=False,
                 **settings):
        self.workers = list(workers)
        self.log = log
        self.title = title
        for key in settings:
            if key not in SETTINGS_BY_NAME:
                hint = did_you_mean(key, list(SETTINGS_BY_NAME))
                raise ConfigError('Manager: unknown setting %r%s' % (
                    key, "; did you mean '%s'?" % hint if hint else ''))
        values = dict(check_interval=float(check_point or 10),
                      graceful_timeout=float(wait_time),
                      proc_name=settings.pop('proc_name', title),
                      number_workers=max(1, len(self.workers)))
        values.update(settings)
        self.cfg = Config(values, section='manager')
        self.cfg.validate('Manager: ')
        if log is not None:
            for w in self.workers:
                w.log = log

    def start(self):
        """Run until stopped (TERM/INT); return the exit status."""
        logger = self.log or log
        if not self.workers:
            logger.info('no workers given: nothing to do')
            return EXIT_OK
        return self._run_master()

    def _run_master(self, run_once=False):
        """Run the Arbiter on these workers here; its exit status."""
        ensure_stdio()      # a script started with `>&-` (as main() does)
        logger = self.log or log
        upgrade = UpgradeState.from_env()
        if upgrade is not None and os.environ.get(PREFLIGHT_ENV):
            return EXIT_OK   # a USR2 preflight: the script got this far
        ready_fd = (daemonize(self.cfg) if self.cfg.daemonize and
                    not upgrade else None)
        logger.info('%s starting', self.title)
        # A script that configured logging itself (uliweb's examples call
        # logging.basicConfig) keeps its handlers; else ours, one line each.
        keep = bool(logging.getLogger().handlers) and not self.cfg.log_file
        arbiter = Arbiter(self.cfg, templates=self.workers,
                          ready_fd=ready_fd, daemonized=self.cfg.daemonize,
                          title=self.title, keep_user_logging=keep,
                          upgrade=upgrade)
        arbiter.run_once = run_once
        # uliweb's manager never gave up on a worker: it backs off instead.
        arbiter.strict_boot = not isinstance(self, UliwebManager)
        status = arbiter.run()
        if status:
            complain(arbiter.halt_reason)
        return status


###############################################################################
# Compatibility with the seeds ################################################
###############################################################################
#
# Code written for the two projects processhandler replaces runs here:
#
# - the original ProcessHandler (gunicorn-derived; Python 2): its imports
#   ``from ProcessHandler.lib.workers.sync import SyncWorker`` and friends
#   are aliases in sys.modules that point at this module's objects.  They
#   are installed by a two-line ``ProcessHandler/__init__.py`` that
#   ``processhandler compat-shim DIR`` writes (a package folder, not a
#   ``ProcessHandler.py`` file: on a case-insensitive file system that
#   would be ``processhandler.py`` itself), and by load_worker_class()
#   for the ``processhandler -c`` path.
# - uliweb's ``uliweb/utils/workers.py``: ``processhandler.uliweb`` is a
#   module alias with its names (Worker, Manager, Timeout, ...) bound to
#   UliwebWorker / UliwebManager, which keep uliweb's semantics (user-kept
#   ``count``, ``is_exit``, SIGALRM timeouts, daemon=True/False).  The
#   plain Worker / Manager keep this file's own semantics.

_EXTRA_LOGS = []          # LogFiles of make_log / setup_file_logging (USR1)

# uliweb's default record format for make_log().
FORMAT = ('[%(levelname)s - %(asctime)s - %(filename)s:%(lineno)s] - '
          '%(message)s')
# ProcessHandler's format for setup_file_logging().
PROCESSHANDLER_FORMAT = '[%(asctime)s] %(levelname)s jobexecute "%(message)s"'


def _file_handler(log, path, formatter):
    """Add a one-write-per-record handler for ``path`` to ``log`` once
    (a worker built again, or init() run again, must not double lines)."""
    path = os.path.abspath(path) if path else None
    for h in log.handlers:
        if isinstance(h, LogFileHandler) and h.logfile.path == path:
            h.setFormatter(formatter)
            return log
    logfile = LogFile(path)
    _EXTRA_LOGS.append(logfile)
    log.addHandler(LogFileHandler(logfile, formatter))
    return log


def make_log(log, log_filename, format=FORMAT, datafmt=None,
             max_bytes=1024 * 1024 * 50, backup_count=5):
    """uliweb's helper: also send ``log``'s records (a Logger or a logger
    name) to ``log_filename``, formatted with ``format``/``datafmt``
    (``format=None``: this file's own line format, tagged once).

    max_bytes and backup_count are accepted and ignored: a size-rotating
    handler shared by several processes loses records; rotate with
    logrotate and USR1 (every worker reopens these files too).
    """
    if isinstance(log, str):
        log = logging.getLogger(log)
    if format is None:
        names = [h.formatter.proc_name for h in logging.getLogger().handlers
                 if isinstance(h.formatter, LineFormatter)]
        formatter = LineFormatter(names[0] if names else 'processhandler')
    else:
        formatter = logging.Formatter(format, datafmt)
    return _file_handler(log, log_filename, formatter)


def setup_file_logging(logger_name, file_name, level=logging.INFO,
                       log_format=PROCESSHANDLER_FORMAT, propagate=0):
    """ProcessHandler's helper (``ProcessHandler.lib.log``): the logger
    ``logger_name`` writes to ``file_name`` in ``log_format``.  (The
    original ignored both names and always wrote ./master.log.)"""
    logger = logging.getLogger(None if logger_name == 'root'
                               else logger_name)
    logger.propagate = propagate
    logger.setLevel(level)
    return _file_handler(logger, file_name, logging.Formatter(log_format))


def parse_args(argv=None):
    """ProcessHandler's ``lib.utils.parse_args``: -c/--config,
    -s/--section."""
    parser = argparse.ArgumentParser()
    parser.add_argument('-c', '--config', action='store',
                        help='Config file path')
    parser.add_argument('-s', '--section', action='store',
                        help='Config file section')
    return parser.parse_args(argv)


def close_on_exec(fd):
    """ProcessHandler's ``lib.utils.close_on_exec``."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


def set_non_blocking(fd):
    """ProcessHandler's ``lib.utils.set_non_blocking``."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


class CompatArbiter(object):
    """ProcessHandler's entry point::

        Arbiter("jobexecute:JobExecute", config_file, section).run()

    ``worker_uri`` becomes the config's worker_class (ProcessHandler's
    config file has none); then it is ``processhandler -c config_file -s
    section start``: foreground or daemon as the file says.  run() never
    returns (like the original's): it exits with the start's status.
    """

    def __init__(self, worker_uri, config_file=None, section=None):
        self.worker_uri = worker_uri
        # The original's default: conf/config.ini beside the application.
        self.config_file = config_file or os.path.join(os.getcwd(), 'conf',
                                                       'config.ini')
        self.section = section

    def argv(self):
        argv = ['-c', self.config_file]
        if self.section:
            argv += ['-s', self.section]
        return argv + ['--set', 'worker_class=' + self.worker_uri, 'start']

    def run(self):
        sys.exit(main(self.argv()))


def _processhandler_aliases():
    """ProcessHandler's module names -> the objects they stand for."""
    lib = 'ProcessHandler.lib'
    return {
        lib: {},
        lib + '.workers': {},
        lib + '.workers.sync': {'SyncWorker': SyncWorker},
        lib + '.workers.base': {'Worker': SyncWorker,
                                'MAXSIZE': SyncWorker.MAXSIZE},
        lib + '.arbiter': {'Arbiter': CompatArbiter},
        lib + '.log': {'setup_file_logging': setup_file_logging,
                       'DEFAULT_FORMAT': PROCESSHANDLER_FORMAT},
        lib + '.utils': {'parse_args': parse_args,
                         'close_on_exec': close_on_exec,
                         'set_non_blocking': set_non_blocking,
                         '_setproctitle': set_proc_title},
    }


def _alias_module(name, attrs):
    """sys.modules[name]: an existing module, or a new one; with ``attrs``
    and bound as an attribute of its parent (``import a.b.c`` then
    ``a.b.c.X`` works)."""
    mod = sys.modules.get(name)
    if mod is None:
        mod = sys.modules[name] = type(sys)(name)
        mod.__path__ = []          # a package: its children are aliases
    for key, value in attrs.items():
        setattr(mod, key, value)
    parent, _, child = name.rpartition('.')
    if parent in sys.modules:
        setattr(sys.modules[parent], child, mod)
    return mod


def install_processhandler_aliases(package=None):
    """Make ``import ProcessHandler.lib.<...>`` give this module's
    classes and functions (idempotent).  ``package``: the shim package
    module that calls this, if any."""
    if package is not None:
        sys.modules['ProcessHandler'] = package
    _alias_module('ProcessHandler', {})
    for name, attrs in sorted(_processhandler_aliases().items()):
        _alias_module(name, attrs)


COMPAT_SHIM = '''"""ProcessHandler -> processhandler (written by compat-shim).

Code written for the original ProcessHandler imports unchanged:
``from ProcessHandler.lib.workers.sync import SyncWorker`` and the like are
aliases of processhandler's objects.
"""
import sys

try:
    import processhandler
except ImportError:       # not installed: where compat-shim found it
    sys.path.append(%r)
    import processhandler

processhandler.install_processhandler_aliases(sys.modules[__name__])
'''


def write_compat_shim(folder):
    """Write ``folder/ProcessHandler/__init__.py``; return its path."""
    package = os.path.join(folder, 'ProcessHandler')
    os.makedirs(package, exist_ok=True)
    if os.path.islink(package):
        raise OSError(errno.ELOOP, '%s is a symbolic link: refusing to '
                      'follow it' % package)
    path = os.path.join(package, '__init__.py')
    here = os.path.dirname(os.path.abspath(__file__))
    # A new file renamed over the old (O_EXCL|O_NOFOLLOW temp file): a
    # symlink planted at the path is replaced, its target never written
    # (as root, any file).
    replace_file(path, COMPAT_SHIM % here, mode=0o644)
    return path


def cmd_compat_shim(args):
    """``processhandler compat-shim DIR``: one line, exit 0 / 2 / 1."""
    if len(args) != 1 or args[0].startswith('-'):
        complain('usage: processhandler compat-shim DIR  (writes '
                 'DIR/ProcessHandler/__init__.py)')
        return EXIT_USAGE
    if not os.path.isdir(args[0]):
        complain('compat-shim: %s is not a folder' % args[0])
        return EXIT_USAGE
    try:
        path = write_compat_shim(args[0])
    except OSError as e:
        complain('compat-shim: cannot write into %s: %s'
                 % (args[0], e.strerror or e))
        return EXIT_FAILURE
    say('wrote %s: `import ProcessHandler.lib...` now uses processhandler'
        % path)
    return EXIT_OK


def compat_problems(cls, cfg):
    """What `check` reports about a seed-style class and its config."""
    if not (cfg.bind and isinstance(cls, type) and
            issubclass(cls, SyncWorker)):
        return []
    # (No inspect: this runs in a child that dropped privileges and may
    # not read the standard library any more.)
    fn = getattr(cls.handle_request, '__func__', cls.handle_request)
    code = getattr(fn, '__code__', None)
    if code is not None and not code.co_flags & 0x04 and not (
            code.co_argcount - len(fn.__defaults__ or ()) <= 4 <=
            code.co_argcount):   # (self, sock, client, addr), or *args
        return ['%s worker_class: %s.handle_request() must take (sock, '
                'client, addr) when bind is set (ProcessHandler calls it '
                'once per accepted connection)' % (cfg.where(),
                                                   cls.__name__)]
    return []


# -- uliweb -------------------------------------------------------------------

class TimeoutException(Exception):
    """Raised inside a uliweb worker's run() when it takes too long."""


class Timeout(object):
    """uliweb's ``with Timeout(seconds):`` -- SIGALRM raises
    TimeoutException in the main thread (seconds may be a float here)."""

    def __init__(self, sec):
        self.sec = sec

    def __enter__(self):
        signal.signal(signal.SIGALRM, self.raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, self.sec)

    def __exit__(self, *args):
        signal.setitimer(signal.ITIMER_REAL, 0)

    def raise_timeout(self, *args):
        raise TimeoutException('Timeout {}s'.format(self.sec))


def get_memory(pid):
    """uliweb's helper: RSS of ``pid`` in MB, 0 if there is no such
    process (psutil when importable, else /proc)."""
    return rss_mb(pid) or 0


def _flush_multiprocessing():
    """A worker ends in os._exit(), which skips atexit: what this process
    put into a multiprocessing.Queue may still sit in the queue's feeder
    thread.  Run multiprocessing's finalizers (they flush and join it),
    as the normal exit of uliweb's workers did."""
    util = sys.modules.get('multiprocessing.util')
    if util is not None:
        try:
            util._run_finalizers()
        except Exception:
            log.exception('flushing multiprocessing queues failed')


class UliwebWorker(Worker):
    """uliweb's ``Worker`` (``from processhandler.uliweb import Worker``).

    Semantics kept from uliweb: ``count`` is kept by user code (``self.count
    += 1``) and the worker ends once it exceeds ``max_requests``; ``timeout``
    raises TimeoutException inside run() (SIGALRM) and the loop goes on; any
    other exception from run() is logged and ends the worker (``is_exit =
    True``; the Manager restarts it when daemon=True); ``is_exit = 'quit'``
    ends it for good; ``check_point`` sleeps after each run; soft/hard
    memory limits default to 200/300 MB and are decided by
    reached_soft/hard_memory_limit(mem) in the master.

    Differences (README "seeds' styles"): TERM/INT call signal_handler(),
    which stops the worker after the current run instead of os._exit(0);
    the soft limit sends TERM, the hard limit KILL (uliweb's documentation;
    its code sent USR2/USR1); a run() still stuck ``wait_time`` seconds
    after its timeout (C code the exception cannot reach) gets its stack
    logged and is killed.
    """

    worker_type = 'sync'
    _id = 1

    def __init__(self, log=None, max_requests=None, soft_memory_limit=200,
                 hard_memory_limit=300, timeout=None, check_point=None,
                 name=None, args=None, kwargs=None, **extra):
        Worker.__init__(self, log=log, args=args, kwargs=kwargs, **extra)
        self.max_requests = max_requests or sys.maxsize
        self.soft_memory_limit = soft_memory_limit
        self.hard_memory_limit = hard_memory_limit
        self.timeout = timeout
        self.check_point = check_point
        self.is_exit = None
        self.count = 0
        self.name = '%s-%d' % (name or 'Process', self._id)
        self.__class__._id += 1

    def apply_limits(self, wait_time):
        """Master side, before the fork: the limits the master enforces,
        from the attributes as they are now (user __init__ may set them).
        The hard timeout is ``timeout + wait_time``: TimeoutException
        comes first."""
        self.options.update(
            soft_memory_limit=self.soft_memory_limit or 0,
            hard_memory_limit=self.hard_memory_limit or 0,
            timeout=self.timeout + wait_time if self.timeout else 0,
            max_requests=0, interval=0)

    def reached_memory_limit(self, kind, mem):
        if kind == 'hard':
            return bool(self.reached_hard_memory_limit(mem))
        return bool(self.reached_soft_memory_limit(mem))

    # -- uliweb's hooks -------------------------------------------------------

    def init(self):
        self.log.info('%s %d created' % (self.name, self.pid))

    def _run(self):
        if self.timeout:
            with Timeout(self.timeout):
                return self.run()
        return self.run()

    def after_run(self):
        if self.is_exit == 'signal':
            why = 'cancelled by signal.'
        elif self.is_exit == 'timeout':
            why = 'cancelled by reaching timeout %ds' % self.timeout
        elif self.is_exit == 'quit':
            why = 'quit!'
        elif self.max_requests and self.count > self.max_requests:
            why = 'cancelled by reaching max requests count [%d]' % (
                self.max_requests)
        else:
            why = 'cancelled by exception occorred'
        self.log.info('%s %d %s' % (self.name, self.pid, why))

    def signal_handler(self, signum, frame):
        """TERM/INT: stop after the current run (graceful)."""
        self.is_exit = 'signal'
        self.log.info('%s %d received a signal %d' % (self.name, self.pid,
                                                       signum))
        self.stop()

    def signal_handler_usr1(self, signum, frame):
        """uliweb's hard-limit signal; here the hard limit is a KILL."""
        self.signal_handler(signum, frame)

    def signal_handler_usr2(self, signum, frame):
        """uliweb's soft-limit signal; here the soft limit sends TERM."""
        self.signal_handler(signum, frame)

    def reached_soft_memory_limit(self, mem):
        return bool(self.soft_memory_limit and mem >= self.soft_memory_limit)

    def reached_hard_memory_limit(self, mem):
        return bool(self.hard_memory_limit and mem >= self.hard_memory_limit)

    # -- the process ----------------------------------------------------------

    def _init_signals(self):
        Worker._init_signals(self)
        signal.signal(signal.SIGTERM, self.signal_handler)
        signal.signal(signal.SIGINT, self.signal_handler)

    def _serve(self):
        status = Worker._serve(self)
        _flush_multiprocessing()
        if status == WORKER_EXIT_OK and self.is_exit == 'quit':
            return WORKER_EXIT_FINISHED
        return status

    def _running(self):
        limit = self.max_requests
        return (self.alive and not self.is_exit and
                (not limit or self.count <= limit))

    def _loop(self):
        """uliweb's loop, with the run stamps the master's hard timeout
        and ``status`` read."""
        board, cell = self._ph.board, self._ph.cell
        while self._running():
            board.setf(cell, Scoreboard.RUN_STARTED, time.monotonic())
            try:
                self._run()
            except TimeoutException:
                self.log.info('Time out')
            except Exception as e:
                self.log.exception(e)
                self.is_exit = True
            finally:
                board.setf(cell, Scoreboard.RUN_STARTED, 0.0)
                self.requests = self.count
                board.set(cell, Scoreboard.REQUESTS, self.count)
            if not self._slow_path():
                return
            if self.check_point and self._running():
                self._pause(self.check_point)
        if self.max_requests and self.count > self.max_requests:
            self._ph.exit_reason = Scoreboard.R_MAX_REQUESTS


class UliwebManager(Manager):
    """uliweb's ``Manager`` (``from processhandler.uliweb import
    Manager``): ``daemon=True`` supervises in the foreground (restarting
    workers that end, except after ``is_exit = 'quit'``) until TERM/INT or
    every worker quit; ``daemon=False`` (the default) starts each worker
    once and returns at once; ``join()`` waits until all have finished
    (and so does the interpreter's exit, as multiprocessing does for its
    children).  Under daemon=False the master is a child of the calling
    process: it stops its workers if the caller dies.
    """

    def __init__(self, workers, log=None, check_point=10,
                 title='Workers Daemon', wait_time=3, daemon=False,
                 **settings):
        log = log or logging.getLogger('processhandler.uliweb')
        Manager.__init__(self, workers, log=log, check_point=check_point,
                         title=title, wait_time=wait_time, daemon=False,
                         **settings)
        self.check_point = check_point
        self.wait_time = wait_time
        self.daemon = daemon
        self.is_exit = False
        self.master_pid = None
        self.exit_status = None

    def init(self):
        rule = '=' * len(self.title)
        for line in (rule, self.title, rule, 'Daemon process %d' % self.pid,
                     'Check point %ss' % self.check_point):
            self.log.info(line)

    def after_run(self):
        pass

    def start(self):
        self.pid = os.getpid()
        for w in self.workers:
            if isinstance(w, UliwebWorker):
                w.apply_limits(self.wait_time)
        self.init()
        if not self.workers:
            self.log.info('No workers need to run.')
            return EXIT_OK
        if self.daemon:
            status = self._run_master()
        else:
            status = self._fork_master()
        self.after_run()
        return status

    def _fork_master(self):
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self.master_pid = pid
            import atexit
            atexit.register(self._join_at_exit)
            return None
        status = EXIT_FAILURE
        try:
            # The caller gone (killed, or returned without join()): stop.
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() == parent:      # else it died before prctl
                status = self._run_master(run_once=True)
        except BaseException:
            log.exception('manager failed')
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status)

    def join(self):
        """Wait until every worker has finished (daemon=False); return the
        master's exit status."""
        pid, self.master_pid = self.master_pid, None
        while pid:
            try:
                _, status = os.waitpid(pid, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                break
            self.exit_status = (os.WEXITSTATUS(status) if
                                os.WIFEXITED(status) else 1)
            break
        return self.exit_status

    def _join_at_exit(self):
        if self.master_pid is None:
            return
        try:
            self.join()
        except KeyboardInterrupt:
            pid, self.master_pid = self.master_pid, None
            if pid:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)


ULIWEB_NAMES = {'Worker': UliwebWorker, 'Manager': UliwebManager,
                'Timeout': Timeout, 'TimeoutException': TimeoutException,
                'make_log': make_log, 'get_memory': get_memory,
                'FORMAT': FORMAT,
                '__all__': ['Worker', 'Manager', 'make_log', 'Timeout',
                            'TimeoutException', 'get_memory']}

# `from processhandler.uliweb import *` replaces `from uliweb.utils.workers
# import *`: processhandler is one file, so the submodule is an alias that
# exists as soon as processhandler is imported (the import system finds it
# in sys.modules right after importing the parent).
_alias_module('processhandler.uliweb', ULIWEB_NAMES)


###############################################################################
# Control client ##############################################################
###############################################################################

class ControlDenied(Exception):
    """The control socket of the master owning ``pidfile`` refused us (a
    master of another user).  Not an OSError on purpose: the commands'
    "does not answer" handlers must not swallow it; main() turns it into
    one line and exit 4, as for a refused signal."""

    def __init__(self, pidfile):
        Exception.__init__(self, pidfile)
        self.pidfile = pidfile


def trusted_peer(sock, pidfile):
    """Whether the process behind a connected control socket is one whose
    answers we may believe (trusted_owner): SO_PEERCRED, not the socket
    file's owner, so a socket swapped in after any check is caught too."""
    cred = peercred_option()
    if cred is None:
        return True
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, cred, struct.calcsize('3i'))
    except OSError:
        return False
    return trusted_owner(struct.unpack('3i', raw)[1], pidfile,
                         'the control socket')


def control_request(pidfile, request, timeout=5.0):
    """Send one JSON request to the master owning ``pidfile``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(control_path(pidfile))
        except PermissionError:
            raise ControlDenied(pidfile)
        if not trusted_peer(s, pidfile):
            raise ConnectionRefusedError(errno.ECONNREFUSED,
                                         'untrusted control socket')
        s.sendall(json.dumps(request).encode('utf-8') + b'\n')
        buf = b''
        while b'\n' not in buf:
            data = s.recv(65536)
            if not data:
                break
            buf += data
    finally:
        s.close()
    return json.loads(buf.decode('utf-8'))


###############################################################################
# CLI #########################################################################
###############################################################################

class ArgumentParser(argparse.ArgumentParser):
    def _print_message(self, message, file=None):
        # Python 3.9's argparse lets a stderr on a full disk raise: the
        # usage error would end as a traceback (exit 1), not exit 2.
        try:
            argparse.ArgumentParser._print_message(self, message, file)
            (file or sys.stderr).flush()
        except (OSError, ValueError, AttributeError):
            discard_stdout(file or sys.stderr)

    def error(self, message):
        # One line, exit 2: the usage block is one -h away.
        self.exit(EXIT_USAGE, 'processhandler: %s (see --help)\n' % message)


def build_parser():
    p = ArgumentParser(
        prog='processhandler',
        description='Master/worker process manager. Commands: %s.'
        % ', '.join(COMMANDS))
    p.add_argument('command', nargs='?', default='start',
                   choices=list(COMMANDS),
                   metavar='COMMAND', help='one of %s (default: start)'
                   % ', '.join(COMMANDS))
    p.add_argument('n', nargs='?', type=int, default=None, metavar='N',
                   help='how many workers to add or remove (incr/decr)')
    p.add_argument('-c', '--config', default=os.environ.get(ENV_CONFIG),
                   help='INI config file (default: $%s)' % ENV_CONFIG)
    p.add_argument('-s', '--section', help='config section (default: the '
                   'only one)')
    p.add_argument('-i', '--instance', type=int, default=None,
                   help='act on instance N only (single_instance = false)')
    p.add_argument('-d', '--daemon', action='store_true',
                   help='daemonize (overrides the config)')
    p.add_argument('-f', '--foreground', action='store_true',
                   help='stay in the foreground (overrides the config)')
    p.add_argument('--set', action='append', default=[],
                   metavar='KEY=VALUE', help='override a config key')
    p.add_argument('--json', action='store_true', help='status as JSON')
    p.add_argument('--print', action='store_true', dest='print_config',
                   help='check: also print the effective config, each value '
                   'with where it came from')
    p.add_argument('--strict', action='store_true', help='check: unknown '
                   'keys that look like a misspelt setting are errors')
    p.add_argument('--watch', action='store_true', help='status: redraw '
                   'every --interval seconds until Ctrl-C')
    p.add_argument('--interval', type=float, default=1.0, metavar='S',
                   help='status --watch: seconds between tables (default 1)')
    p.add_argument('--count', type=int, default=0, metavar='N',
                   help='status --watch: stop after N tables')
    p.add_argument('--save', action='store_true', help='incr/decr: also '
                   'write number_workers into the config file; start: '
                   'TTIN/TTOU do too')
    p.add_argument('--timeout', type=float, default=None,
                   help='stop/reload/incr/decr: seconds to wait (default: '
                   'graceful_timeout + 10; reload: at least 60; incr/decr: '
                   'the boot timeout + 5)')
    p.add_argument('--no-wait', action='store_true', help='reload: only '
                   'send HUP; incr/decr: only ask; do not wait for the '
                   'outcome')
    p.add_argument('--version', action='version',
                   version='processhandler ' + __version__)
    return p


def target_instances(cfg, args):
    found = instances(cfg)
    if args.instance is not None:
        found = [i for i in found if i[0] == args.instance]
    return [i for i in found if i[2] > 0]


def cmd_start(cfg, args):
    if not os.environ.get(UPGRADE_ENV):
        close_inherited_fds()   # a USR2 image's fds are its own
    upgrade = UpgradeState.from_env()
    if upgrade is not None and os.environ.get(PREFLIGHT_ENV):
        return upgrade_preflight(cfg, upgrade)
    if upgrade is not None:
        return start_upgraded(cfg, args, upgrade)
    try:
        check_log_target(cfg.log_file)
    except ConfigError as e:
        raise ConfigError('%s %s' % (cfg.where(), e))
    try:
        resolve_user_group(cfg.user, cfg.group)
    except ConfigError as e:   # name the file and section, as check does
        raise ConfigError('%s %s' % (cfg.where(), e))
    error, warning = privilege_notes(cfg)
    if error:
        raise ConfigError(error)
    if warning:
        complain(warning)
    worker_class = master_worker_class(cfg)
    if cfg.single_instance:
        running = target_instances(cfg, args)
        if running:
            n, path, pid = running[0]
            complain('already running (pid %d, pidfile %s)' % (pid, path))
            return EXIT_FAILURE
    daemon = (args.daemon or cfg.daemonize) and not args.foreground
    try:
        os.umask(cfg.umask)
        os.chdir(cfg.base_path)
    except OSError as e:
        complain('cannot enter base_path %s: %s' % (cfg.base_path,
                                                    e.strerror))
        return EXIT_FAILURE
    ready_fd = daemonize(cfg) if daemon else None
    arbiter = Arbiter(cfg, worker_class, ready_fd=ready_fd,
                      daemonized=daemon, save_on_signal=args.save)
    status = arbiter.run()
    if status and not daemon:
        complain(arbiter.halt_reason)
    return status


def not_permitted(pid, path):
    """One line and LSB status 4 for a command the OS refused: a master
    of another user (root) is signalled and asked only by that user."""
    try:
        owner = ' (it runs as uid %d)' % os.stat(path).st_uid
    except OSError:
        owner = ''
    complain('not permitted to control master pid %d%s: run this command '
             'as the same user or as root' % (pid, owner))
    return EXIT_NO_PERMISSION


def start_upgraded(cfg, args, upgrade):
    """The new image of a USR2, after the exec (no way back): what fails
    now is logged and worked around, the adopted workers keep serving."""
    try:
        worker_class = master_worker_class(cfg)
    except ConfigError as e:
        _UPGRADE_PROBLEMS.append(str(e))
        worker_class = None    # retried at the next spawn or HUP
    os.umask(cfg.umask)
    try:
        os.chdir(cfg.base_path)
    except OSError as e:
        _UPGRADE_PROBLEMS.append('cannot enter base_path %s: %s'
                                 % (cfg.base_path, e.strerror))
    return Arbiter(cfg, worker_class, daemonized=upgrade.daemonized,
                   save_on_signal=args.save, upgrade=upgrade).run()


def cmd_stop(cfg, args):
    found = target_instances(cfg, args)
    if not found:
        say_done('not running')
        return EXIT_OK
    for n, path, pid in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except PermissionError:
            return not_permitted(pid, path)
    limit = (args.timeout if args.timeout is not None else
             cfg.graceful_timeout + 10)
    began = time.monotonic()
    # Gone means: lock released AND process exited (it releases the lock
    # a moment before its interpreter is done).
    left = wait_until(lambda: [i for i in found if running_pid(i[1]) or
                               pid_exists(i[2])], limit,
                      StopProgress() if sys.stdout.isatty() else None)
    took = time.monotonic() - began
    for n, path, pid in found:
        if (n, path, pid) in left:
            complain('pid %d did not stop within %gs' % (pid, limit))
        else:
            say_done('stopped (pid %d) in %.1f s' % (pid, took))
    return EXIT_FAILURE if left else EXIT_OK


class StopProgress(object):
    """`stop` on a terminal: one line redrawn in place (at most every
    REDRAW seconds) saying what the stop still waits for, from the
    masters' status (they answer while they stop)."""

    REDRAW = 0.5

    def __init__(self):
        self.began = time.monotonic()    # when TERM was sent
        self.next_draw = 0.0
        self.drawn = False

    def __call__(self, left):
        now = time.monotonic()
        if not left:
            if self.drawn:           # the final line replaces it
                out('\r\x1b[K')
            return
        if now < self.next_draw:
            return
        self.next_draw = now + self.REDRAW
        out('\r%s\x1b[K' % printable(self.line(left)))
        self.drawn = True

    def line(self, left):
        rows, answered = [], False
        for n, path, pid in left:
            try:
                doc = control_request(path, {'cmd': 'status'}, timeout=0.3)
                rows += [w for w in doc['workers'] if w.get('pid')]
                answered = True
            except (OSError, ValueError, KeyError, TypeError):
                pass    # closing its socket: the master is nearly gone
        if not answered:
            return 'waiting for %s to exit' % ', '.join(
                'pid %d' % i[2] for i in left)
        text = '%d worker%s left' % (len(rows), '' if len(rows) == 1
                                     else 's')
        busy = [w for w in rows if w.get('busy_for') is not None]
        if busy:
            w = max(busy, key=lambda w: w['busy_for'])
            text += '; slot %s in run() for %.1f s' % (w['slot'],
                                                        w['busy_for'])
        elif rows:   # run() is timed only with `timeout` set
            text += '; slot %s (pid %s) %s for %.1f s' % (
                rows[0]['slot'], rows[0]['pid'], rows[0]['state'],
                time.monotonic() - self.began)
        return text


def pid_exists(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
            return f.read().rsplit(b')', 1)[1].split()[0] != b'Z'
    except (OSError, IndexError):
        pass
    if os.path.isdir('/proc'):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def wait_until(pending, limit, progress=None):
    """Poll ``pending()`` (10 ms doubling to 0.2 s) until falsy or limit;
    ``progress(left)``, if given, is shown each time (and at the end)."""
    deadline = time.monotonic() + limit
    delay = 0.01
    left = pending()
    while left and time.monotonic() < deadline:
        if progress is not None:
            progress(left)
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
        left = pending()
    if progress is not None:
        progress([])
    return left


def cmd_restart(cfg, args):
    """stop, then start the way the master was started: one started with
    -d comes back as a daemon, not in the foreground (-f or -d decide)."""
    if not (args.daemon or args.foreground) and started_as_daemon(cfg, args):
        args.daemon = True
    status = cmd_stop(cfg, args)
    if status != EXIT_OK:
        return status
    return cmd_start(cfg, args)


def started_as_daemon(cfg, args):
    """Whether a running instance says it is a daemon (status' master
    'daemonized'); if none answers within 2 s, the config's daemonize
    decides, as for start."""
    for n, path, pid in target_instances(cfg, args):
        try:
            doc = control_request(path, {'cmd': 'status'}, timeout=2.0)
            return bool(doc['master'].get('daemonized'))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return False


def signal_instances(cfg, args, sig, done):
    found = target_instances(cfg, args)
    if not found:
        say('not running')
        return EXIT_NOT_RUNNING
    for n, path, pid in found:
        try:
            os.kill(pid, sig)
        except PermissionError:
            return not_permitted(pid, path)
        say('%s (pid %d)' % (done, pid))
    return EXIT_OK


def cmd_reload(cfg, args):
    """Check, HUP, and (unless --no-wait) follow the reload to its end."""
    try:   # the master would refuse it: say so here, send nothing
        check_log_target(cfg.log_file)
    except ConfigError as e:
        raise ConfigError('%s %s' % (cfg.where(), e))
    if cfg.worker_class:   # a broken config/class: say so, send nothing
        problem = validate_in_child(cfg)
        if problem:
            raise ConfigError(problem.replace('\n', '; '))
    if args.no_wait:
        return signal_instances(cfg, args, signal.SIGHUP, 'reloading')
    found = target_instances(cfg, args)
    if not found:
        say('not running')
        return EXIT_NOT_RUNNING
    before = dict((path, last_reload(path)) for n, path, pid in found)
    for n, path, pid in found:
        try:
            os.kill(pid, signal.SIGHUP)
        except PermissionError:
            return not_permitted(pid, path)
        except ProcessLookupError:   # gone since we looked
            found = [f for f in found if f[2] != pid]
    limit = (args.timeout if args.timeout is not None else
             max(60.0, cfg.graceful_timeout + 10))
    status = EXIT_OK
    for n, path, pid in found:
        if before[path] == {}:
            say('reloading (pid %d): this master does not report the '
                'outcome' % pid)
            continue
        r = (None if before[path] is None else
             wait_for_reload(path, before[path]['count'], limit))
        status = max(status, report_reload(pid, r, limit))
    return status


def last_reload(pidfile):
    """master.reload of status: None when the master does not answer,
    {} when it does not report reloads (an older version)."""
    try:
        return control_request(pidfile, {'cmd': 'status'})['master'].get(
            'reload', {})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wait_for_reload(pidfile, count, limit):
    """The reload after the ``count``-th, once it is done or failed
    (polled 10 ms doubling to 0.2 s); None after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    delay = 0.01
    while True:
        r = last_reload(pidfile)
        if r and r['count'] > count and r['result'] in ('done', 'failed'):
            return r
        if time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def report_reload(pid, r, limit):
    if r is None:
        complain('reload (pid %d): no outcome within %gs (see status)'
                 % (pid, limit))
        return EXIT_FAILURE
    if r['result'] == 'failed':
        complain('reload failed (pid %d), the previous workers keep '
                 'serving: %s' % (pid, r['reason']))
        return EXIT_FAILURE
    say('reloaded (pid %d): generation %d running' % (pid, r['generation']))
    return EXIT_OK


def cmd_reopen(cfg, args):
    return signal_instances(cfg, args, signal.SIGUSR1, 'reopening logs')


def cmd_status(cfg, args):
    if args.watch:
        return watch_status(cfg, args)
    found = target_instances(cfg, args)
    if not found:
        if args.json:
            out(json.dumps({'master': None, 'workers': []}) + '\n')
        else:
            say('not running')
        return EXIT_NOT_RUNNING
    docs, status = [], EXIT_OK
    for n, path, pid in found:
        try:
            docs.append(pids_seen_here(control_request(
                path, {'cmd': 'status'}), pid))
        except (OSError, ValueError) as e:
            complain('master pid %d holds %s but its control socket does '
                     'not answer (%s)' % (pid, path, e))
            status = EXIT_FAILURE
    if args.json:
        out(json.dumps(docs[0] if len(docs) == 1 else
                       {'instances': docs}, indent=1) + '\n')
    else:
        for doc in docs:
            out(format_status(doc) + '\n')
    return status


def nspid(pid):
    """[pid as seen here, ..., pid in its own namespace] (/proc NSpid)."""
    try:
        with open('/proc/%d/status' % pid) as f:
            for line in f:
                if line.startswith('NSpid:'):
                    return [int(p) for p in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return None


def pids_seen_here(doc, pid):
    """A status document from a master in another pid namespace (a
    container) names the pids of that namespace ("master 1"): a `kill` of
    them here would hit other processes.  Put the pids as seen here in
    ``pid`` and the namespace's in ``ns_pid`` (None where not visible).
    ``pid``: the master as we see it (the holder of the lock)."""
    m = doc.get('master') or {}
    if m.get('pid') in (None, pid):
        return doc
    seen = {}
    for p in [pid] + sorted(child_pids(pid)):
        ns = nspid(p)
        if ns:
            seen[ns[-1]] = p
    try:
        m['pid_namespace'] = os.readlink('/proc/%d/ns/pid' % pid)
    except OSError:
        m['pid_namespace'] = 'another pid namespace'
    m['ns_pid'], m['pid'] = m['pid'], pid
    if m.get('spare'):
        m['spare'] = seen.get(m['spare'])
    for w in doc.get('workers', ()):
        if w.get('pid'):
            w['ns_pid'], w['pid'] = w['pid'], seen.get(w['pid'])
    return doc


def format_status(doc):
    m = doc['master']
    running = sum(1 for w in doc['workers'] if w['state'] == 'running')
    lines = ['%s: master %d %s, up %s, %d/%d worker(s) running, '
             'config %s [%s]%s' % (
                 m['proc_name'], m['pid'], m['state'],
                 format_age(m['uptime']), running, m['number_workers'],
                 m['config'] or '-', m['section'],
                 ' instance %d' % m['instance'] if m['instance'] > 1
                 else '')]
    if m.get('ns_pid') is not None:
        lines.append('pids as seen here; in its own pid namespace (%s) the '
                     'master is %d' % (m['pid_namespace'], m['ns_pid']))
    lead = m.get('leader')
    if lead:
        holder = lead.get('holder') or 'nobody'
        if holder == lead.get('token'):
            holder += ' (this master)'
        lines.append('leader lock %s: held by %s%s' % (
            lead['lock'], holder, ', lease %.1fs left' % lead['lease_left']
            if lead.get('lease_left') is not None else ''))
    logf = m.get('log') or {}
    if logf.get('write_errors'):
        lines.append('log %s: %d write error(s), the last at %s: %s' % (
            logf['path'] or 'stderr', logf['write_errors'], time.strftime(
                '%Y-%m-%d %H:%M:%S', time.localtime(logf['last_error_at'])),
            logf['last_error']))
    lines += status_table(doc['workers'])
    if m.get('spare'):
        waiting = any(w['state'] == 'backoff' for w in doc['workers'])
        lines.append('spare process %d: pre-forked, replaces the next worker '
                     'that exits%s' % (m['spare'], ' (a slot in backoff '
                                       'waits for its next attempt)'
                                       if waiting else ''))
    for key in ('reload', 'upgrade'):
        last = m.get(key) or {}
        if last.get('result') == 'failed':
            lines.append('last %s failed: %s' % (key, last.get('reason')))
    return '\n'.join(printable(line) for line in lines)


def status_table(workers):
    """The worker rows of `status`.  While a reload rolls (a slot holds
    processes of two generations) a ``gen`` column tells old from new."""
    gens = {}
    for w in workers:
        if w.get('pid') and w.get('generation') is not None:
            gens.setdefault(w['slot'], set()).add(w['generation'])
    rolling = any(len(g) > 1 for g in gens.values())
    fmt = ('%-5s ' + ('%-4s ' if rolling else '%.0s') +
           '%-8s %-9s %9s %8s %9s%s')
    lines = [fmt % ('slot', 'gen', 'pid', 'state', 'requests', 'rss_mb',
                    'age', '')]
    for w in workers:
        extra = ''
        if w['state'] == 'backoff':
            extra = '  %s, next attempt in %.1fs: %s' % (
                w.get('waiting', 'backoff'), w.get('next_attempt_in', 0),
                w.get('last_error'))
        gen = w.get('generation')
        lines.append(fmt % (
            w['slot'], '-' if gen is None else gen, w['pid'] or '-',
            w['state'], w['requests'],
            '-' if w['rss_mb'] is None else '%.1f' % w['rss_mb'],
            '-' if w['age'] is None else format_age(w['age']), extra))
    return lines


def format_age(seconds):
    if seconds < 120:
        return '%.1fs' % seconds
    if seconds < 7200:
        return '%dm%02ds' % divmod(int(seconds), 60)
    return '%dh%02dm' % divmod(int(seconds) // 60, 60)


def cmd_health(cfg, args):
    """The probe: no user code, one control request, one line."""
    found = target_instances(cfg, args)
    if not found:
        say('not running')
        return EXIT_NOT_RUNNING
    status = EXIT_OK
    limit = args.timeout if args.timeout is not None else 1.0
    for n, path, pid in found:
        try:
            reply = control_request(path, {'cmd': 'health'}, timeout=limit)
            healthy, why = reply['healthy'], reply['reason']
        except (OSError, ValueError, KeyError) as e:
            healthy, why = False, 'master pid %d does not answer (%s)' % (
                pid, e)
        say('%s: %s%s' % ('healthy' if healthy else 'unhealthy', why,
                          ' (pid %d)' % pid if len(found) > 1 else ''))
        if not healthy:
            status = EXIT_FAILURE
    return status


def cmd_metrics(cfg, args):
    """Prometheus text format, for node_exporter's textfile collector."""
    found = target_instances(cfg, args)
    if not found:
        say('not running')
        return EXIT_NOT_RUNNING
    if len(found) > 1:   # one exposition cannot hold two masters' series
        raise ConfigError('%d instances are running: choose one with -i N'
                          % len(found))
    n, path, pid = found[0]
    try:
        text = control_request(path, {'cmd': 'metrics'})['text']
    except (OSError, ValueError, KeyError) as e:
        complain('master pid %d does not answer: %s' % (pid, e))
        return EXIT_FAILURE
    out(text)
    return EXIT_OK


def watch_status(cfg, args):
    """`status --watch`: a table per interval (requests/s from the slot
    totals, which survive recycles) until Ctrl-C or --count tables.  On a
    terminal each table replaces the last; otherwise they follow each
    other, each under a separator line."""
    tty = sys.stdout.isatty()
    shown, before = 0, {}
    try:
        while True:
            found = target_instances(cfg, args)
            if not found:
                say('not running')
                return EXIT_NOT_RUNNING
            tables = []
            for n, path, pid in found:
                try:
                    doc = control_request(path, {'cmd': 'status'})
                    snap = control_request(path, {'cmd': 'metrics',
                                                  'format': 'json'})
                    tables.append(format_watch(doc, snap['metrics'], before))
                except (OSError, ValueError, KeyError) as e:
                    complain('master pid %d does not answer: %s' % (pid, e))
                    return EXIT_FAILURE
            stamp = '-- %s (every %gs, Ctrl-C to quit) --' % (
                time.strftime('%H:%M:%S'), args.interval)
            if not out(('\x1b[H\x1b[2J' if tty else '') + stamp + '\n' +
                       '\n'.join(tables) + '\n'):
                return EXIT_OK     # `status --watch | head`
            shown += 1
            if args.count and shown >= args.count:
                return EXIT_OK
            time.sleep(max(0.05, args.interval))
    except KeyboardInterrupt:
        # Ctrl-C: what is still buffered must not block the exit (a
        # terminal that stopped reading, Ctrl-S).
        discard_stdout()
        return EXIT_OK


def format_watch(doc, snap, before):
    """The status table with a req/s column; ``before`` keeps each
    master's previous (time, per-slot totals) between calls."""
    m, now = doc['master'], time.monotonic()
    totals = dict((int(k), v) for k, v in snap['requests'].items())
    then, old = before.get(m['pid'], (None, {}))
    before[m['pid']] = (now, totals)
    lines = ['%s: master %d %s, up %s, generation %d, %d/%d running, '
             '%d in backoff, %d requests' % (
                 m['proc_name'], m['pid'], m['state'],
                 format_age(m['uptime']), snap['generation'],
                 snap['running'], snap['wanted'], snap['backoff'],
                 sum(totals.values())),
             '%-5s %-8s %-9s %8s %9s %8s %9s' % (
                 'slot', 'pid', 'state', 'req/s', 'requests', 'rss_mb',
                 'age')]
    for w in doc['workers']:
        rate = '-'
        if then is not None and w['slot'] in old and w['slot'] in totals:
            rate = '%.1f' % ((totals[w['slot']] - old[w['slot']]) /
                             max(now - then, 1e-6))
        lines.append('%-5s %-8s %-9s %8s %9s %8s %9s' % (
            w['slot'], w['pid'] or '-', w['state'], rate,
            totals.get(w['slot'], 0),
            '-' if w['rss_mb'] is None else '%.1f' % w['rss_mb'],
            '-' if w['age'] is None else format_age(w['age'])))
    return '\n'.join(printable(line) for line in lines)


def cmd_incr(cfg, args, sign=1):
    """incr/decr N: ask each master, then (unless --no-wait) wait until
    the count is reached and say so: exit 1 when it is not in time."""
    n = 1 if args.n is None else args.n
    if n < 1:
        raise ConfigError('N must be a positive number, got %d' % n)
    if n > MAX_WORKERS:
        raise ConfigError('N must be at most %d (the maximum number of '
                          'workers), got %d' % (MAX_WORKERS, n))
    found = target_instances(cfg, args)
    if not found:
        say('not running')
        return EXIT_NOT_RUNNING
    cmd = 'incr' if sign > 0 else 'decr'
    asked = []
    for i, path, pid in found:
        try:
            before = control_request(path, {'cmd': 'status'})
            reply = control_request(path, {'cmd': cmd, 'n': n})
        except (OSError, ValueError) as e:
            complain('master pid %d does not answer: %s' % (pid, e))
            return EXIT_FAILURE
        if not reply.get('ok'):
            complain('pid %d: %s' % (pid, reply.get('error')))
            return EXIT_USAGE
        asked.append((path, pid, before, reply['number_workers']))
    new = asked[-1][3]
    if args.save:
        status = save_count(cfg, new)
        if status != EXIT_OK:
            return status
    limit = (args.timeout if args.timeout is not None else
             max(boot_timeout_of(cfg) or 60.0, cfg.graceful_timeout) + 5)
    deadline = time.monotonic() + limit
    status = EXIT_OK
    for path, pid, before, want in asked:
        status = max(status, report_scale(
            path, pid, before, want, capped_note(cmd, n, before, want),
            None if args.no_wait else deadline, limit))
    return status


def save_count(cfg, new):
    """incr/decr --save: number_workers = ``new`` into the config file."""
    if not cfg.path:
        raise ConfigError('--save needs a config file')
    try:
        save_number_workers(cfg.path, cfg.section, new)
    except OSError as e:
        complain('cannot save number_workers to %s: %s'
                 % (cfg.path, e.strerror or e))
        return EXIT_FAILURE
    say('saved number_workers = %d in %s [%s]' % (new, cfg.path,
                                                   cfg.section))
    return EXIT_OK


def capped_note(cmd, n, before, want):
    """'' or why the master's count is not the one asked for."""
    was = before['master']['number_workers']
    asked = was + n if cmd == 'incr' else was - n
    if want == asked:
        return ''
    if cmd == 'decr' and asked < 1 and want == 1:
        return '; %s %d capped at 1: never fewer than one worker' % (cmd, n)
    if asked > MAX_WORKERS and want == MAX_WORKERS:
        return '; %s %d capped at the maximum of %d' % (cmd, n, MAX_WORKERS)
    if before['master'].get('stopping'):
        return '; unchanged: the master is stopping'
    return '; asked for %d, the master keeps %d' % (asked, want)


def workers_word(n):
    return '%d worker%s' % (n, '' if n == 1 else 's')


def report_scale(path, pid, before, want, note, deadline, limit):
    """Wait (unless ``deadline`` is None) for ``want`` running workers of
    the master owning ``path``; one line saying how it ended."""
    was = before['master']['number_workers']
    head = '(was %d; pid %d)' % (was, pid)
    if deadline is None or before['master'].get('state') == 'standby':
        say('%s wanted %s%s%s' % (workers_word(want), head, note,
                                  '; not waiting (--no-wait)'
                                  if deadline is None else
                                  '; a standby master: they start when it '
                                  'takes the leader lock'))
        return EXIT_OK
    failures = dict((w['slot'], w.get('failures', 0))
                    for w in before['workers'])
    reached, running, why = scale_progress(path, want, failures, deadline)
    if reached:
        say('%s running %s%s' % (workers_word(want), head, note))
        return EXIT_OK
    complain('%d of %s running after %.1f s %s%s: %s' % (
        running, workers_word(want), limit - max(0.0, deadline -
                                                 time.monotonic()),
        head, note, why))
    return EXIT_FAILURE


def scale_progress(path, want, failures, deadline):
    """Poll status (10 ms doubling to 0.2 s) until ``want`` workers run
    in slots 1..want and no other slot has a process left, until a slot
    fails again (its boot failed: say why now, as reload does) or until
    ``deadline``.  Returns (reached, running, why not)."""
    delay, reasons = 0.01, {}
    while True:
        try:
            rows = control_request(path, {'cmd': 'status'})['workers']
        except (OSError, ValueError, KeyError, TypeError) as e:
            return False, 0, 'the master does not answer (%s)' % e
        up = set(w['slot'] for w in rows
                 if w['state'] == 'running' and w['slot'] <= want)
        extra = [w for w in rows if w['slot'] > want and w.get('pid')]
        if len(up) == want and not extra:
            return True, want, ''
        for w in rows:
            if w.get('last_error'):
                reasons[w['slot']] = w['last_error']
        failed = [w for w in rows if w['slot'] <= want and
                  w['slot'] not in up and
                  w.get('failures', 0) > failures.get(w['slot'], 0)]
        if failed or time.monotonic() >= deadline:
            return False, len(up), '; '.join(
                scale_missing(failed or rows, up, want, reasons) +
                ['slot %s (pid %s) still %s' % (w['slot'], w['pid'],
                                                w['state']) for w in extra])
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def scale_missing(rows, up, want, reasons):
    """Why each wanted slot without a running worker has none."""
    out, seen = [], set()
    for w in rows:
        slot = w['slot']
        if slot > want or slot in up or slot in seen:
            continue
        seen.add(slot)
        if w['state'] == 'booting':
            out.append('slot %d booting for %.1f s' % (slot, w['age'] or 0))
        else:
            out.append('slot %d %s%s' % (slot, 'in ' if w['state'] ==
                                         'backoff' else '', w['state']))
        if w.get('failures'):
            out[-1] += ' after %d failure%s: %s' % (
                w['failures'], '' if w['failures'] == 1 else 's',
                reasons.get(slot, 'see the log'))
    return out or ['slots %s not started yet' % ', '.join(
        str(i) for i in range(1, want + 1) if i not in up)]


def cmd_decr(cfg, args):
    return cmd_incr(cfg, args, sign=-1)


def log_file_check(cfg):
    """`check`: an existing log_file that start would refuse (owner)."""
    try:
        st = os.stat(cfg.log_file, follow_symlinks=False)
        owner = log_owner(cfg)
    except (OSError, TypeError, ValueError, ConfigError):
        return []
    if stat.S_ISLNK(st.st_mode):
        return []      # path_problems() says it: the link, not its owner
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        return []   # its type: check_log_target's line
    problem = log_file_problem(st, owner)
    return (['%s log_file: %s %s' % (cfg.where(), cfg.log_file, problem)]
            if problem else [])


def cmd_check(cfg, args):
    problems = list(getattr(args, 'problems', None) or [])
    notes = []
    if 'INVALID' not in cfg.sources.get('worker_class', ''):  # said already
        problem = validate_in_child(cfg)
        problems += problem.split('\n') if problem else []
    for key, hint in cfg.unknown_keys():
        notes.append(key)
        if not hint:
            continue
        # A worker key that merely looks like a setting (job_timeout) is
        # legitimate: a warning, an error only with --strict.
        msg = ("%s %s: unknown key, passed to the workers as a string; did "
               "you mean '%s'?" % (cfg.where(), key, hint))
        if args.strict:
            problems.append(msg)
        else:
            complain('warning: ' + msg)
    try:
        check_log_target(cfg.log_file)
    except ConfigError as e:
        problems.append('%s %s' % (cfg.where(), e))
    try:
        resolve_user_group(cfg.user, cfg.group)
        error, warning = privilege_notes(cfg)
        problems += [error] if error else []
        if warning:
            complain('warning: ' + warning)
    except ConfigError as e:
        problems.append('%s %s' % (cfg.where(), e))
    problems += path_problems(cfg) + log_file_check(cfg)
    for line in unsafe_import_folders(cfg):   # as for unknown keys
        if args.strict:
            problems.append(line)
        else:
            complain('warning: ' + line)
    problems = list(dict.fromkeys(problems))   # one line per problem
    if args.print_config:
        out(format_config(cfg) + '\n')
    for p in problems:
        complain(p)
    if problems:
        return EXIT_USAGE
    say('%s [%s]: ok (%s, %d %s worker(s))%s' % (
        cfg.path, cfg.section, cfg.worker_class, cfg.number_workers,
        cfg.worker_type, '; keys passed to workers: ' + ', '.join(notes)
        if notes else ''))
    return EXIT_OK


def gevent_imports(cfg):
    """check only: gevent is there, but does it import?  (Harmless in the
    check process; the master itself never imports it.)"""
    if cfg.worker_type != 'gevent':
        return []
    try:
        importlib.import_module('gevent')
    except Exception as e:
        return ['%s worker_type: gevent does not import (%s: %s)' % (
            cfg.where(), type(e).__name__, ' '.join(str(e).split()))]
    return []


def path_problems(cfg):
    problems = []
    for key in ('log_file', 'pidfile'):
        path = getattr(cfg, key)
        if (path and path != '-' and
                not os.path.isdir(os.path.dirname(path))):
            problems.append('%s %s: folder %s does not exist' % (
                cfg.where(), key, os.path.dirname(path)))
        elif path and path != '-' and os.path.islink(path):
            # start opens both O_NOFOLLOW (a link planted by another user
            # must not redirect root's writes): it would fail with ELOOP.
            problems.append('%s %s: %s is a symbolic link: start refuses '
                            'to open it; name the file itself'
                            % (cfg.where(), key, path))
    if not os.path.isdir(cfg.base_path):
        problems.append('%s base_path: %s is not a folder'
                        % (cfg.where(), cfg.base_path))
    return problems


def format_config(cfg):
    """`check --print`: the effective config as INI, each value followed
    by where it came from (default, file, --set, environment)."""
    def show(s, v):
        if s.name == 'umask':
            return '%03o' % v
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return ','.join(str(x) for x in v)
        return ('' if v is None else str(v).lower()
                if s.name == 'log_level' else str(v))
    rows = [(s.name, show(s, getattr(cfg, s.name)),
             cfg.sources.get(s.name, 'default')) for s in SETTINGS]
    rows += [(k, v, '%s, passed to workers' % cfg.sources.get(k, 'file'))
             for k, v in sorted(cfg.extras.items())]
    width = max(len(k) for k, _, _ in rows)
    vwidth = min(40, max(len(v) for _, v, _ in rows))
    return '\n'.join(['; %s' % cfg.path, '[%s]' % cfg.section] + [
        '%-*s = %-*s  ; %s' % (width, k, vwidth, v, src)
        for k, v, src in rows])


# The commands, in the order --help lists them: name -> cmd_<name>(cfg, args).
COMMANDS = {'start': cmd_start, 'stop': cmd_stop, 'restart': cmd_restart,
            'reload': cmd_reload, 'status': cmd_status, 'incr': cmd_incr,
            'decr': cmd_decr, 'reopen': cmd_reopen, 'check': cmd_check,
            'health': cmd_health, 'metrics': cmd_metrics}


def load_start_config(args):
    """load_config(); after a USR2 exec, a config that no longer loads
    falls back to the old image's (the serving workers must not pay)."""
    try:
        return load_config(args.config, args.section, args.set,
                           problems=args.problems, from_env=env_overrides())
    except ConfigError as e:
        state = UpgradeState.from_env(keep=True)
        if (state is None or not state.config or
                os.environ.get(PREFLIGHT_ENV)):
            raise
        _UPGRADE_PROBLEMS.append('the config no longer loads (%s): running '
                                 'with the previous one' % e)
        return state.previous_config()


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    ensure_stdio()
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ['compat-shim']:     # needs no config: see its section
        return cmd_compat_shim(words[1:])
    args = build_parser().parse_args(argv)
    try:
        if not args.config:
            raise ConfigError('no config file: give -c CONFIG or set %s'
                              % ENV_CONFIG)
        # check reports every bad value at once; the others stop at one.
        args.problems = [] if args.command == 'check' else None
        cfg = load_start_config(args)
        for key, hint in cfg.unknown_keys():
            if hint and args.command != 'check':
                complain("%s %s: unknown key, passed to workers as a "
                         "string; did you mean '%s'?"
                         % (cfg.where(), key, hint))
        return COMMANDS[args.command](cfg, args)
    except ConfigError as e:
        complain(e)
        return EXIT_USAGE
    except HaltServer as h:
        complain(h.reason)
        return h.exit_status
    except ControlDenied as e:
        return not_permitted(running_pid(e.pidfile), e.pidfile)
    except StdoutFailed as e:
        return stdout_failed(e.error)
    except KeyboardInterrupt:
        return EXIT_FAILURE


# Commands that start a master (none given means start).
MASTER_COMMANDS = ('start', 'restart')

# How `python3 processhandler.py start` becomes a lean master (see _main()).
# `python -c` puts the current directory first on sys.path, where
# `python3 /path/processhandler.py` put the script's folder: started as root
# from /tmp, the master would import an attacker's difflib.py.  So the first
# statement removes that entry, before anything is imported (os and sys
# are loaded already at start-up), and the script's folder takes its place,
# exactly as the original command had it.  Under -I or -P the original
# command put nothing there, and `import processhandler` needs its folder:
# master_exec_argv() runs the script itself then (see there).
LEAN_START = '''import sys
if sys.path and sys.path[0] in ('', '.'):
    del sys.path[0]
import os
path = sys.argv[1]
sys.argv = [path] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(path))
import processhandler
processhandler._START['argv'] = list(sys.argv)
sys.exit(processhandler.main())'''


def starts_master(argv):
    words = [a for a in argv if a in COMMANDS]
    return not words or words[0] in MASTER_COMMANDS


def _main():
    # A master run as a script carries the script's syntax tree for its
    # whole life: CPython frees a __main__ file's AST only when the script
    # returns (~7 MB here), and every fork copies page tables for it and
    # every worker exit unmaps them (respawn and recycle pay it).  So a
    # master re-executes itself (same pid, args, env and fds) as an import
    # of this module, whose AST is freed right after compiling.
    if (not IS_PYPY and starts_master(sys.argv[1:]) and
            not isolated_path() and
            not os.environ.get('PROCESSHANDLER_NO_LEAN')):
        try:
            os.execv(sys.executable, master_exec_argv(
                [os.path.abspath(__file__)] + sys.argv[1:]))
        except OSError:
            pass     # run here, as a script: heavier, same behaviour
    # The running script is the module: user code doing `import
    # processhandler` must get this module, not a second copy whose Worker
    # class would be a different class.
    sys.modules.setdefault('processhandler', sys.modules[__name__])
    sys.exit(main())


if __name__ == '__main__':
    _main()
