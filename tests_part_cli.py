"""CLI, config, pidfile and write-back tests (to be merged into
test_processhandler.py).  Real processes, observed from outside."""
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import uuid

import pytest

import processhandler
from test_processhandler import (DEADLINE, HERE, PH, PY, Project, alive,
                                 assert_one_line_error, ppid_of, proc_state,
                                 proj,
                                 wait_for)

assert Project and proj   # the fixture is used by name below


# -- helpers for this part -------------------------------------------------------

def run_ph(args, cwd, python=PY, timeout=60):
    """Run the CLI with an explicit working directory."""
    return subprocess.run([python, PH] + list(args), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, cwd=cwd, timeout=timeout)


def pids_mentioning(text):
    """Live pids (not us) whose command line or title contains ``text``."""
    found = []
    for name in os.listdir('/proc'):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open('/proc/%s/cmdline' % name, 'rb') as f:
                cmd = f.read().replace(b'\0', b' ').decode('utf-8', 'replace')
        except OSError:
            continue
        if text in cmd and alive(int(name)):
            found.append(int(name))
    return found


def unique_name():
    return 'ph' + uuid.uuid4().hex[:8]


def one_line(res):
    """The single stderr line of a failed command (asserts there is one)."""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert 'Traceback' not in res.stderr
    return lines[0]


def wait_count(proj, n, *args):
    """Wait until ``status --json *args`` shows exactly n running workers."""
    def running():
        doc = proj.status(*args)
        rows = doc and [w for w in doc['workers'] if w['state'] == 'running']
        return rows and len(rows) == n and rows
    return wait_for(running, what='%d running workers' % n)


def read_pid(path):
    """The pid in ``path``, or None (missing, empty, half-written)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def track_started(proj, pidfile=None):
    """If a command started a master after all, have the fixture kill it."""
    path = pidfile or proj.pidfile
    if os.path.exists(path) and not os.path.islink(path):
        try:
            proj.masters.add(proj.master_pid(path))
        except ValueError:
            pass


class ReadOnly(object):
    """Make a file or folder read-only, for root too (chattr +i)."""

    def __init__(self, path):
        self.path = path
        self.mode = stat.S_IMODE(os.stat(path).st_mode)
        self.immutable = False

    def __enter__(self):
        os.chmod(self.path, self.mode & ~0o222)
        if os.geteuid() == 0:
            res = subprocess.run(['chattr', '+i', self.path],
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
            if res.returncode != 0:
                os.chmod(self.path, self.mode)
                pytest.skip('root and no chattr +i here: %s' % res.stdout)
            self.immutable = True
        return self

    def __exit__(self, *exc):
        if self.immutable:
            subprocess.run(['chattr', '-i', self.path], check=True)
        os.chmod(self.path, self.mode)


QUIET_WORKER = '''
    import time, processhandler
    class Quiet(processhandler.Worker):
        def run(self):
            time.sleep(0.05)
            return True
'''


# -- config --------------------------------------------------------------------------

def test_seed_example_config_works_as_is(proj):
    """examples/jobexecute/config.ini ([DEFAULT] + a section, daemonize,
    %(base_path)s interpolation, single_instance = false) runs unchanged:
    start (daemonizes by itself), status, stop."""
    example = os.path.join(HERE, 'examples', 'jobexecute')
    for name in ('config.ini', 'jobexecute.py'):
        shutil.copy(os.path.join(example, name), proj.path)
    res = proj.ph('start')
    track_started(proj)
    assert res.returncode == 0, (res.stderr, proj.log_text())
    master = proj.master_pid()
    proj.wait_running(2)
    doc = proj.status()
    assert doc['master']['pid'] == master
    assert doc['master']['proc_name'] == 'jobexecute'
    assert doc['master']['section'] == 'jobexecute'
    assert doc['master']['config'] == proj.config
    wait_for(lambda: 'go... job' in proj.log_text(), what='a job in the log')
    res = proj.ph('stop')
    assert res.returncode == 0, res.stderr
    assert not alive(master)
    assert not os.path.exists(proj.pidfile)


BAD_VALUES = [
    ('worker_class', 'testworker.Job'),
    ('worker_class', 'testworker:'),
    ('number_workers', 'three'),
    ('number_workers', '-1'),
    ('number_workers', '0'),
    ('number_workers', '2.5'),
    ('worker_type', 'fork'),
    ('threads', '0'),
    ('max_requests', '-5'),
    ('max_requests_jitter', 'lots'),
    ('timeout', '-1'),
    ('timeout', 'nan'),
    ('graceful_timeout', 'soon'),
    ('soft_memory_limit', '-1'),
    ('hard_memory_limit', '1e400'),
    ('interval', 'inf'),
    ('check_interval', '0'),
    ('daemonize', 'maybe'),
    ('proc_name', 'a\0b'),
    ('pidfile', 'run/a\0b.pid'),
    ('single_instance', '2'),
    ('base_path', 'a\0b'),
    ('log_path', 'a\0b'),
    ('log_file', 'a\0b.log'),
    ('log_level', 'loud'),
    ('user', 'no_such_user_ph'),
    ('group', 'no_such_group_ph'),
    ('umask', '099'),
    ('umask', '1000'),
    ('cpu_affinity', '1-x'),
    ('cpu_affinity', '3-1'),
    ('bind', 'localhost'),
    ('bind', '127.0.0.1:99999'),
    ('bind', '[::1'),
    ('reuse_port', 'sometimes'),
    ('accept_lock', 'y3s'),
    ('leader_lock', 'http://example.com/lock'),
    ('leader_ttl', '0'),
]


def test_bad_values_cover_every_setting():
    """The table below really exercises every key of SETTINGS."""
    assert set(k for k, v in BAD_VALUES) == set(processhandler.SETTINGS_BY_NAME)


@pytest.mark.parametrize('key,value', BAD_VALUES,
                         ids=['%s=%r' % kv for kv in BAD_VALUES])
def test_bad_value_is_one_line_exit_2(proj, key, value):
    """A bad value: exit 2, one stderr line naming file, [section] and key;
    for `check` and for `start` alike, and nothing starts."""
    proj.write_config(**{key: value})
    key_re = re.compile(r'\[job\]:? %s:' % re.escape(key))
    for cmd in (['check'], ['start', '-d']):
        res = proj.ph(*cmd)
        track_started(proj)
        assert_one_line_error(res, proj.config)
        assert key_re.search(res.stderr), (cmd, res.stderr)
    assert not os.path.exists(proj.pidfile)


@pytest.mark.parametrize('soft,hard', [('100', '100'), ('100', '50')])
def test_hard_memory_limit_must_exceed_soft(proj, soft, hard):
    proj.write_config(soft_memory_limit=soft, hard_memory_limit=hard)
    for cmd in (['check'], ['start', '-d']):
        res = proj.ph(*cmd)
        track_started(proj)
        assert_one_line_error(res, proj.config, '[job]', 'hard_memory_limit',
                              'soft_memory_limit')
    proj.write_config(soft_memory_limit=soft, hard_memory_limit='150')
    assert proj.ph('check').returncode == 0


def test_misspelt_key_did_you_mean(proj):
    """`number_worker = 3`: check fails (exit 2) with a suggestion; start
    warns in one line and runs with the default (the key is not applied)."""
    proj.write_config(number_workers=None, number_worker=3)
    res = proj.ph('check')
    assert_one_line_error(res, proj.config, '[job]', 'number_worker',
                          "did you mean 'number_workers'")
    res = proj.ph('start', '-d')
    track_started(proj)
    assert res.returncode == 0, res.stderr
    assert "did you mean 'number_workers'" in one_line(res)
    proj.wait_running(1)
    assert proj.status()['master']['number_workers'] == 1


def test_unknown_key_without_suggestion_is_quietly_passed(proj):
    proj.write_config(queue_name='jobs')
    res = proj.ph('check')
    assert res.returncode == 0, res.stderr
    assert res.stderr == ''
    assert 'queue_name' in res.stdout


def test_set_overrides_the_file(proj):
    """--set key=value beats the file; --set without '=' is a usage error."""
    proj.write_config(number_workers=2)
    proj.start_daemon('--set', 'number_workers=3')
    proj.wait_running(3)
    assert proj.status()['master']['number_workers'] == 3
    for bad in ('number_workers', '=3'):
        res = proj.ph('status', '--set', bad)
        assert_one_line_error(res, '--set')
    res = proj.ph('status', '--set', 'number_workers=x')
    assert_one_line_error(res, 'number_workers')


def test_section_selection(proj):
    """-s: the only section is the default; with several it is required
    (the error lists them); a wrong name gets a did-you-mean."""
    proj.write_config(section='jobexecute')
    res = proj.ph('check')
    assert res.returncode == 0, res.stderr
    assert '[jobexecute]' in res.stdout
    with open(proj.config, 'a') as f:
        f.write('[reports]\nworker_class = testworker:Job\n')
    res = proj.ph('check')
    assert_one_line_error(res, proj.config, 'jobexecute', 'reports', '-s')
    res = proj.ph('status')
    assert_one_line_error(res, 'jobexecute', 'reports')
    res = proj.ph('-s', 'jobexecut', 'check')
    assert_one_line_error(res, proj.config, "did you mean 'jobexecute'")
    res = proj.ph('-s', 'reports', 'check')
    assert res.returncode == 0, res.stderr
    assert '[reports]' in res.stdout


@pytest.mark.parametrize('extra,key', [
    ('a = %(b)s\nb = %(a)s\n', None),
    ('queue = %(nowhere)s\n', 'queue'),
    ('log_path = %(missing_dir)s/logs\n', 'log_path'),
])
def test_interpolation_errors(proj, extra, key):
    """Interpolation loops and missing references: exit 2, one line."""
    proj.write_config()
    with open(proj.config, 'a') as f:
        f.write(extra)
    for cmd in ('check', 'status', 'start'):
        res = proj.ph(cmd)
        track_started(proj)
        assert_one_line_error(res, proj.config, '[job]')
        if key:
            assert ' %s:' % key in res.stderr


@pytest.mark.parametrize('kind', ['missing', 'directory', 'binary',
                                  'no_section', 'empty'])
def test_unreadable_config_file(proj, kind):
    """Missing file, a folder, binary garbage, no section header, empty:
    exit 2, one line naming the file, no traceback -- for every command."""
    path = os.path.join(proj.path, 'bad.ini')
    if kind == 'directory':
        os.mkdir(path)
    elif kind == 'binary':
        with open(path, 'wb') as f:
            f.write(b'\x7fELF\x02\x01\x01\x00\xff\xfe\x80\x81' * 64)
    elif kind == 'no_section':
        with open(path, 'w') as f:
            f.write('worker_class = testworker:Job\n')
    elif kind == 'empty':
        open(path, 'w').close()
    for cmd in ('start', 'check', 'status', 'stop', 'reload', 'incr'):
        res = proj.ph(cmd, config=path)
        assert_one_line_error(res, path)


def test_usage_errors_are_one_line():
    for args in ([], ['-c'], ['-c', 'x.ini', 'frobnicate'],
                 ['-c', 'x.ini', 'incr', 'many']):
        res = run_ph(args, cwd=HERE)
        assert_one_line_error(res)


def test_relative_paths(proj):
    """base_path relative to the config file's folder (not the cwd);
    pidfile and log_file relative to base_path."""
    conf = os.path.join(proj.path, 'conf')
    app = os.path.join(proj.path, 'app')
    for d in (conf, app, os.path.join(app, 'run'), os.path.join(app, 'logs')):
        os.mkdir(d)
    shutil.move(os.path.join(proj.path, 'testworker.py'), app)
    config = os.path.join(conf, 'config.ini')
    with open(config, 'w') as f:
        f.write('[job]\nworker_class = testworker:Job\nbase_path = ../app\n'
                'pidfile = run/master.pid\nlog_file = logs/master.log\n'
                'number_workers = 1\n')
    pidfile = os.path.join(app, 'run', 'master.pid')
    res = run_ph(['-c', config, 'start', '-d'], cwd='/')
    track_started(proj, pidfile)
    assert res.returncode == 0, res.stderr
    master = proj.master_pid(pidfile)
    doc = json.loads(run_ph(['-c', config, 'status', '--json'],
                            cwd=proj.path).stdout)
    assert doc['master']['pid'] == master
    assert doc['master']['pidfile'] == pidfile
    # The worker writes events.log into cfg.base_path; the master logs.
    wait_for(lambda: os.path.exists(os.path.join(app, 'events.log')))
    wait_for(lambda: os.path.getsize(os.path.join(app, 'logs', 'master.log')))
    with open('/proc/%d/cwd/events.log' % master):
        pass                                  # the master's cwd is base_path
    assert not os.path.exists(os.path.join(conf, 'run'))
    res = run_ph(['-c', 'conf/config.ini', 'stop'], cwd=proj.path)
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(pidfile)


CFG_DUMP_WORKER = '''
    import json, os, time, processhandler

    class Dump(processhandler.Worker):
        def init(self):
            c = self.cfg
            doc = {'queue': c['queue'], 'attr': c.queue,
                   'batch': c.get('batch_size'), 'retry': c['retry_key'],
                   'region': c.get('region'), 'missing': c.get('nope', 'dflt'),
                   'number_workers': c.number_workers, 'in': 'queue' in c,
                   'types': sorted(set(type(c[k]).__name__ for k in
                                       ('queue', 'batch_size', 'retry_key',
                                        'region')))}
            path = os.path.join(c.base_path, 'cfg.json')
            with open(path + '.tmp', 'w') as f:
                json.dump(doc, f)
            os.rename(path + '.tmp', path)

        def run(self):
            time.sleep(0.05)
            return True
'''


def test_unknown_keys_reach_the_worker_as_strings(proj):
    proj.write_module('dump', CFG_DUMP_WORKER)
    proj.write_config(text='[DEFAULT]\nregion = eu-1\n[job]\n'
                      'worker_class = dump:Dump\nnumber_workers = 1\n'
                      'pidfile = %s\nlog_file = %s\nqueue = jobs:high\n'
                      'batch_size = 50\nretry_key = %%(queue)s:retry\n'
                      % (proj.pidfile, proj.log))
    proj.start_daemon('--set', 'batch_size=75')
    path = os.path.join(proj.path, 'cfg.json')
    wait_for(lambda: os.path.exists(path))
    with open(path) as f:
        doc = json.load(f)
    assert doc == {'queue': 'jobs:high', 'attr': 'jobs:high', 'batch': '75',
                   'retry': 'jobs:high:retry', 'region': 'eu-1',
                   'missing': 'dflt', 'number_workers': 1, 'in': True,
                   'types': ['str']}


# -- CLI exit codes -------------------------------------------------------------------

def test_commands_when_not_running(proj):
    """status 3, stop 0, reload/incr/decr/reopen 3; nothing is created."""
    proj.write_config()
    assert proj.ph('status').returncode == 3
    res = proj.ph('status', '--json')
    assert res.returncode == 3
    assert json.loads(res.stdout) == {'master': None, 'workers': []}
    assert proj.ph('stop').returncode == 0
    for cmd in (['reload'], ['incr'], ['decr', '2'], ['reopen'],
                ['incr', '1', '--save']):
        res = proj.ph(*cmd)
        assert res.returncode == 3, (cmd, res.stdout, res.stderr)
    assert sorted(os.listdir(proj.path)) == ['config.ini', 'testworker.py']


def test_check_ok_and_problems(proj):
    """check: 0 when fine, 2 with one line per problem; starts nothing."""
    proj.write_config()
    res = proj.ph('check')
    assert res.returncode == 0, res.stderr
    assert 'ok' in res.stdout and res.stderr == ''
    proj.write_module('notworker', '''
        class Job(object):
            def run(self):
                return True
        not_a_class = 3
    ''')
    proj.write_module('boom', '''
        raise RuntimeError('cannot reach the database at import')
    ''')
    proj.write_module('broken', '''
        def run(:
    ''')
    cases = [('nosuchmodule:Job', 'nosuchmodule'),
             ('testworker:Nope', 'Nope'),
             ('notworker:Job', 'not a subclass'),
             ('notworker:not_a_class', 'not a subclass'),
             ('boom:Job', 'cannot reach the database'),
             ('broken:Job', 'SyntaxError')]
    for worker_class, needle in cases:
        proj.write_config(worker_class=worker_class)
        res = proj.ph('check')
        assert_one_line_error(res, proj.config, '[job]', 'worker_class',
                              needle)
    proj.write_config(number_workers=None, number_worker=2)
    assert_one_line_error(proj.ph('check'), "did you mean 'number_workers'")
    assert not os.path.exists(proj.pidfile)
    assert not os.path.exists(proj.events_path)


def test_restart_gives_a_new_master(proj):
    proj.write_config(daemonize='true')
    res = proj.ph('start')
    track_started(proj)
    assert res.returncode == 0, res.stderr
    first = proj.master_pid()
    old = proj.wait_running(2)
    res = proj.ph('restart')
    track_started(proj)
    assert res.returncode == 0, (res.stderr, proj.log_text())
    second = proj.master_pid()
    assert second != first
    wait_for(lambda: not alive(first), what='the old master gone')
    new = proj.wait_running(2)
    assert not set(new.values()) & set(old.values())
    assert all(ppid_of(p) == second for p in new.values())
    assert not any(alive(p) for p in old.values())


def test_status_json_document(proj):
    proj.write_config(number_workers=2, proc_name='jobby')
    master = proj.start_daemon()
    proj.wait_running(2)
    doc = proj.status()
    m = doc['master']
    assert set(m) >= {'pid', 'proc_name', 'state', 'uptime', 'config',
                      'section'}
    assert (m['pid'], m['proc_name'], m['state'], m['config'],
            m['section']) == (master, 'jobby', 'active', proj.config, 'job')
    assert isinstance(m['uptime'], (int, float)) and m['uptime'] >= 0
    assert [w['slot'] for w in doc['workers']] == [1, 2]
    for w in doc['workers']:
        assert set(w) >= {'slot', 'pid', 'state', 'requests', 'rss_mb', 'age'}
        assert w['state'] == 'running'
        assert ppid_of(w['pid']) == master
        assert isinstance(w['requests'], int) and w['age'] >= 0
    text = proj.ph('status')
    assert text.returncode == 0
    for w in doc['workers']:
        assert str(w['pid']) in text.stdout


def test_incr_decr_change_the_count(proj):
    """incr N / decr N (default 1); decr never goes below one worker."""
    proj.write_config(number_workers=2)
    proj.start_daemon()
    proj.wait_running(2)
    for args, expect in ((['incr', '2'], 4), (['decr'], 3),
                         (['decr', '10'], 1), (['incr'], 2)):
        res = proj.ph(*args)
        assert res.returncode == 0, (args, res.stderr)
        workers = proj.wait_running(expect)
        assert sorted(workers) == list(range(1, expect + 1))
        assert proj.status()['master']['number_workers'] == expect
    for bad in ('0', '-1'):
        res = proj.ph('incr', bad)
        assert res.returncode == 2, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('breakage', ['number_workers = lots\n',
                                      'worker_class = gone:Job\n'])
def test_reload_with_broken_config_does_not_signal(proj, breakage):
    """reload with a broken config: the error, exit 2, no HUP sent."""
    proj.write_config(number_workers=2)
    master = proj.start_daemon()
    before = proj.wait_running(2)
    good = open(proj.config).read()
    with open(proj.config, 'w') as f:
        f.write(good.replace('number_workers = 2\n', '') + breakage)
    res = proj.ph('reload')
    assert_one_line_error(res, proj.config, breakage.split()[0])
    # A marker signal sent after it: a HUP would have been handled first.
    os.kill(master, signal.SIGUSR1)
    wait_for(lambda: 'log file reopened' in proj.log_text())
    assert 'reload failed' not in proj.log_text()
    assert 'reloaded' not in proj.log_text()
    with open(proj.config, 'w') as f:        # status needs a good config
        f.write(good)
    assert proj.running_workers(2) == before
    assert proj.status()['master']['generation'] == 1
    # The same observation sees a reload once the config is fixed.
    with open(proj.config, 'w') as f:
        f.write(good.replace('number_workers = 2', 'number_workers = 3'))
    assert proj.ph('reload').returncode == 0
    wait_for(lambda: 'reloaded' in proj.log_text())
    proj.wait_running(3)


# -- start-up failures ---------------------------------------------------------------

FAIL_INIT_WORKER = '''
    import os, processhandler

    class Job(processhandler.Worker):
        def init(self):
            fd = os.open('boot.pids', os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, ('%d %d\\n' % (os.getpid(), os.getppid())).encode())
            os.close(fd)
            raise RuntimeError('database unreachable')

        def run(self):
            return True
'''


def boot_pids(proj):
    try:
        with open(os.path.join(proj.path, 'boot.pids')) as f:
            return set(int(p) for p in f.read().split())
    except OSError:
        return set()


def test_init_failure_daemon_start_fails(proj):
    """start -d with a worker whose init() raises: exit 1, one line naming
    the exception; nothing left running and no pidfile."""
    name = unique_name()
    proj.write_module('failinit', FAIL_INIT_WORKER)
    proj.write_config(worker_class='failinit:Job', proc_name=name)
    res = proj.ph('start', '-d')
    track_started(proj)
    assert res.returncode == 1, (res.stdout, res.stderr)
    line = one_line(res)
    assert 'RuntimeError' in line and 'database unreachable' in line
    assert not os.path.exists(proj.pidfile)
    assert not os.path.exists(processhandler.control_path(proj.pidfile))
    pids = boot_pids(proj)
    assert pids                               # a worker did try to boot
    proj.masters.update(pids)
    wait_for(lambda: not any(alive(p) for p in pids), what='all gone')
    wait_for(lambda: not pids_mentioning(name), what='no process left')
    assert proj.ph('status').returncode == 3


def test_init_failure_foreground_exits_1(proj):
    proj.write_module('failinit', FAIL_INIT_WORKER)
    proj.write_config(worker_class='failinit:Job')
    p = proj.start_foreground()
    assert p.wait(DEADLINE) == 1
    lines = proj.fg_output().strip().splitlines()
    assert len(lines) == 1, lines
    assert 'RuntimeError' in lines[0] and 'database unreachable' in lines[0]
    assert not os.path.exists(proj.pidfile)
    pids = boot_pids(proj)
    assert pids
    assert not any(alive(p) for p in pids)


@pytest.mark.parametrize('source', [
    "raise ImportError('No module named redis')\n",
    'def run(:\n',
    'import no_such_dependency_ph\n',
])
def test_worker_class_import_failure_exit_2(proj, source):
    proj.write_module('badimport', source)
    proj.write_config(worker_class='badimport:Job')
    for args in (['start', '-d'], ['start', '-f']):
        res = proj.ph(*args)
        track_started(proj)
        assert_one_line_error(res, proj.config, 'worker_class', 'badimport')
    assert not os.path.exists(proj.pidfile)


def test_second_master_refused_names_the_pid(proj):
    """single_instance = true: a second master (daemon or foreground)
    exits 1 naming the running pid; the first is untouched."""
    proj.write_config(single_instance='true')
    master = proj.start_daemon()
    workers = proj.wait_running(2)
    for args in (['start', '-d'], ['start', '-f'], ['start']):
        res = proj.ph(*args)
        track_started(proj)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert str(master) in one_line(res)
    assert proj.master_pid() == master
    assert proj.running_workers(2) == workers


NOISY_WORKER = '''
    import os, sys, time, processhandler

    class Noisy(processhandler.Worker):
        def run(self):
            print('hello from print %d' % self.slot)
            sys.stdout.flush()
            sys.stderr.write('complaint on stderr %d\\n' % self.slot)
            sys.stderr.flush()
            os.write(1, b'raw fd 1 write\\n')
            time.sleep(0.1)
            return True
'''


def test_daemon_worker_stdio_goes_to_log_file(proj):
    proj.write_module('noisy', NOISY_WORKER)
    proj.write_config(worker_class='noisy:Noisy', number_workers=1)
    proj.start_daemon()
    for needle in ('hello from print 1', 'complaint on stderr 1',
                   'raw fd 1 write'):
        wait_for(lambda: needle in proj.log_text(), what=needle)


@pytest.mark.parametrize('how', ['folder', 'missing_folder'])
def test_log_file_that_cannot_be_opened(proj, how):
    """log_file naming a folder, or inside a missing one: start (daemon or
    foreground) exits 1 with one line naming it, no traceback, no pidfile."""
    log_file = os.path.join(proj.path, 'logs')
    if how == 'folder':
        os.mkdir(log_file)
    else:
        log_file = os.path.join(log_file, 'master.log')
    proj.write_config(log_file=log_file)
    for args in (['start', '-d'], ['start', '-f']):
        res = proj.ph(*args)
        track_started(proj)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        line = one_line(res)
        assert 'log_file' in line and log_file in line
        assert not os.path.exists(proj.pidfile)


def test_foreground_flag_beats_daemonize(proj):
    """-f keeps the master in the foreground even with daemonize = true;
    it exits 0 on TERM."""
    proj.write_config(daemonize='true', number_workers=1)
    p = proj.start_foreground()
    wait_for(lambda: read_pid(proj.pidfile), what='the pidfile')
    assert proj.master_pid() == p.pid
    proj.wait_running(1)
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(DEADLINE) == 0
    assert not os.path.exists(proj.pidfile)


def test_empty_proc_name_is_the_section(proj):
    proj.write_config(proc_name='', number_workers=1)
    proj.start_daemon()
    assert proj.status()['master']['proc_name'] == 'job'


# -- pidfile and instance lock ----------------------------------------------------------

def dead_pid():
    p = subprocess.Popen(['true'])
    p.wait()
    return p.pid


@pytest.mark.parametrize('content', ['garbage\n', '', '-1\n', 'dead',
                                     'foreign'])
def test_stale_pidfile(proj, content):
    """A pidfile whose pid is dead, garbage or a live process that does not
    hold the lock: status 3, stop 0 and nobody signalled, start takes it
    over (exit 0) and writes the new master's pid."""
    foreign = None
    if content == 'dead':
        content = '%d\n' % dead_pid()
    elif content == 'foreign':
        foreign = subprocess.Popen(['sleep', '60'])
        content = '%d\n' % foreign.pid
    try:
        proj.write_config()
        with open(proj.pidfile, 'w') as f:
            f.write(content)
        assert proj.ph('status').returncode == 3
        assert proj.ph('stop').returncode == 0
        for cmd in ('reload', 'reopen', 'incr'):
            assert proj.ph(cmd).returncode == 3
        if foreign:
            assert foreign.poll() is None and proc_state_ok(foreign.pid)
        master = proj.start_daemon()
        assert master != (foreign and foreign.pid)
        assert proj.master_pid() == master
        proj.wait_running(2)
        assert proj.ph('stop').returncode == 0
        assert not alive(master)
        if foreign:
            assert foreign.poll() is None and proc_state_ok(foreign.pid)
    finally:
        if foreign:
            foreign.kill()
            foreign.wait()


def proc_state_ok(pid):
    """Alive and not stopped."""
    return proc_state(pid) in ('S', 'R', 'D')


def test_pidfile_symlink_refused(proj):
    """A pidfile path planted as a symlink: start refuses (exit 1) with a
    clear message, the target is untouched; status/stop follow nothing."""
    victim = os.path.join(proj.path, 'victim.txt')
    with open(victim, 'w') as f:
        f.write('precious\n')
    os.chmod(victim, 0o600)
    os.symlink(victim, proj.pidfile)
    proj.write_config()
    res = proj.ph('start', '-d')
    track_started(proj)
    assert res.returncode == 1, (res.stdout, res.stderr)
    line = one_line(res)
    assert 'symbolic link' in line and proj.pidfile in line
    with open(victim) as f:
        assert f.read() == 'precious\n'
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
    assert os.path.islink(proj.pidfile)
    assert proj.ph('status').returncode == 3
    assert proj.ph('stop').returncode == 0
    # A dangling symlink is not followed to create its target either.
    os.unlink(proj.pidfile)
    target = os.path.join(proj.path, 'created-through-link')
    os.symlink(target, proj.pidfile)
    res = proj.ph('start', '-d')
    track_started(proj)
    assert res.returncode == 1
    assert 'symbolic link' in one_line(res)
    assert not os.path.exists(target)


def test_pidfile_and_socket_modes(proj):
    """Even with umask 000 the pidfile is not group/world-writable, an old
    world-writable pidfile is fixed, the control socket is 0600, and both
    are removed on exit."""
    proj.write_config(umask='000')
    with open(proj.pidfile, 'w') as f:
        f.write('garbage\n')
    os.chmod(proj.pidfile, 0o666)
    proj.start_daemon()
    proj.wait_running(2)
    assert os.stat(proj.pidfile).st_mode & 0o022 == 0
    sock = processhandler.control_path(proj.pidfile)
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert proj.ph('stop').returncode == 0
    assert not os.path.exists(proj.pidfile)
    assert not os.path.exists(sock)


def test_fresh_pidfile_mode(proj):
    proj.write_config(umask='000')
    proj.start_daemon()
    assert os.stat(proj.pidfile).st_mode & 0o022 == 0
    assert proj.ph('stop').returncode == 0
    assert not os.path.exists(proj.pidfile)


@pytest.mark.parametrize('how', ['readonly', 'missing', 'notadir'])
def test_unwritable_pid_directory(proj, how):
    """pidfile in a folder we cannot write (or that does not exist): a
    clear one-line message naming the pidfile, exit 1, nothing left."""
    name = unique_name()
    piddir = os.path.join(proj.path, 'run')
    if how == 'notadir':
        open(piddir, 'w').close()
    elif how == 'readonly':
        os.mkdir(piddir)
    pidfile = os.path.join(piddir, 'master.pid')
    proj.write_config(pidfile=pidfile, proc_name=name)

    def attempt():
        res = proj.ph('start', '-d')
        track_started(proj, pidfile)
        assert res.returncode == 1, (res.stdout, res.stderr)
        assert pidfile in one_line(res)
        assert not os.path.exists(pidfile)
        wait_for(lambda: not pids_mentioning(name), what='no process left')

    if how == 'readonly':
        with ReadOnly(piddir):
            attempt()
    else:
        attempt()


# -- several instances -------------------------------------------------------------------

def test_several_instances(proj):
    """single_instance = false: a second start is instance 2 (master.pid.2);
    status shows both; -i 2 stop stops only it; plain stop stops all."""
    proj.write_config(single_instance='false', number_workers=1)
    first = proj.start_daemon()
    res = proj.ph('start', '-d')
    assert res.returncode == 0, res.stderr
    second = proj.master_pid(proj.pidfile + '.2')
    proj.masters.add(second)
    assert second != first

    def both_running():
        res = proj.ph('status', '--json')
        if res.returncode != 0:
            return None
        doc = json.loads(res.stdout)
        docs = doc.get('instances')
        if not docs or not all(any(w['state'] == 'running'
                                   for w in d['workers']) for d in docs):
            return None
        return docs
    docs = wait_for(both_running)
    assert [(d['master']['pid'], d['master']['instance']) for d in docs] == \
        [(first, 1), (second, 2)]
    one = json.loads(proj.ph('-i', '2', 'status', '--json').stdout)
    assert one['master']['pid'] == second
    assert proj.ph('-i', '3', 'status').returncode == 3
    res = proj.ph('-i', '2', 'stop')
    assert res.returncode == 0, res.stderr
    assert not alive(second)                # stop waits until it is gone
    assert not os.path.exists(proj.pidfile + '.2')
    assert alive(first) and proj.master_pid() == first
    assert proj.status()['master']['pid'] == first
    res = proj.ph('start', '-d')          # takes the free number 2 again
    assert res.returncode == 0, res.stderr
    third = proj.master_pid(proj.pidfile + '.2')
    proj.masters.add(third)
    res = proj.ph('stop')
    assert res.returncode == 0, res.stderr
    wait_for(lambda: not alive(first) and not alive(third))
    assert not os.path.exists(proj.pidfile)
    assert not os.path.exists(proj.pidfile + '.2')
    assert proj.ph('status').returncode == 3


# -- config write-back -----------------------------------------------------------------

def save_config_text(proj, n, eol):
    lines = [
        '; processhandler config, hand-written',
        '[DEFAULT]',
        'graceful_timeout = 5',
        'number_workers = 9',
        '',
        '[other]',
        'worker_class = testworker:Job',
        'number_workers   =   7',
        '',
        '[job]',
        '# how many workers: keep this comment',
        'worker_class            = testworker:Job',
        'number_workers          = %d' % n,
        'pidfile                 = %s' % proj.pidfile,
        'log_file                = %s' % proj.log,
        'run_time = 0.02',
        '',
        '',
        '; trailing comment',
        '[zzz]',
        'worker_class = testworker:Job',
        'number_workers = 4',
    ]
    return (eol.join(lines) + eol).encode()


@pytest.mark.parametrize('eol', ['\n', '\r\n'])
def test_save_rewrites_only_the_number_workers_line(proj, eol):
    """incr --save / decr --save: the file is byte for byte the same except
    for that one line of that section; the mode (0640) is kept."""
    with open(proj.config, 'wb') as f:
        f.write(save_config_text(proj, 2, eol))
    os.chmod(proj.config, 0o640)
    proj.start_daemon('-s', 'job')
    wait_count(proj, 2, '-s', 'job')
    inode = os.stat(proj.config).st_ino
    res = proj.ph('-s', 'job', 'incr', '2', '--save')
    assert res.returncode == 0, res.stderr
    with open(proj.config, 'rb') as f:
        assert f.read() == save_config_text(proj, 4, eol)
    assert stat.S_IMODE(os.stat(proj.config).st_mode) == 0o640
    assert os.stat(proj.config).st_ino != inode     # replaced (rename)
    wait_count(proj, 4, '-s', 'job')
    res = proj.ph('-s', 'job', 'decr', '1', '--save')
    assert res.returncode == 0, res.stderr
    with open(proj.config, 'rb') as f:
        assert f.read() == save_config_text(proj, 3, eol)
    assert stat.S_IMODE(os.stat(proj.config).st_mode) == 0o640
    wait_count(proj, 3, '-s', 'job')
    assert [n for n in os.listdir(proj.path) if n.startswith('.')] == []
    assert proj.ph('-s', 'job', 'check').returncode == 0


def test_save_adds_the_key_to_its_section(proj):
    """A section without number_workers (inherited from [DEFAULT]) gets the
    line at its end; [DEFAULT] keeps its own."""
    text = ('[DEFAULT]\nnumber_workers = 1\n\n[job]\n'
            'worker_class = testworker:Job\npidfile = %s\nlog_file = %s\n\n'
            '[later]\nworker_class = testworker:Job\n'
            % (proj.pidfile, proj.log))
    proj.write_config(text=text)
    proj.start_daemon('-s', 'job')
    wait_count(proj, 1, '-s', 'job')
    res = proj.ph('-s', 'job', 'incr', '--save')
    assert res.returncode == 0, res.stderr
    with open(proj.config) as f:
        assert f.read() == text.replace(
            'log_file = %s\n' % proj.log,
            'log_file = %s\nnumber_workers = 2\n' % proj.log)
    wait_count(proj, 2, '-s', 'job')


@pytest.mark.parametrize('what', ['folder', 'file'])
def test_save_to_read_only_config(proj, what):
    """--save into a read-only folder or file: one clear line, exit 1, the
    file unchanged, and the master keeps running with the new count."""
    confdir = os.path.join(proj.path, 'conf')
    os.mkdir(confdir)
    config = os.path.join(confdir, 'config.ini')
    text = ('[job]\nworker_class = testworker:Job\nnumber_workers = 1\n'
            'pidfile = %s\nlog_file = %s\nbase_path = %s\n'
            % (proj.pidfile, proj.log, proj.path))
    with open(config, 'w') as f:
        f.write(text)
    proj.config = config
    master = proj.start_daemon()
    proj.wait_running(1)
    with ReadOnly(confdir if what == 'folder' else config):
        res = proj.ph('incr', '--save')
        assert res.returncode == 1, (res.stdout, res.stderr)
        line = one_line(res)
        assert config in line and 'number_workers' in line
        with open(config) as f:
            assert f.read() == text
        assert os.listdir(confdir) == ['config.ini']
    assert alive(master)
    proj.wait_running(2)
    assert proj.status()['master']['number_workers'] == 2


# -- API and packaging -----------------------------------------------------------------

def test_all():
    """__all__ names exist, are unique, and list the public API."""
    names = processhandler.__all__
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(processhandler, name), name
    expected = {'Worker', 'SyncWorker', 'Arbiter', 'Manager', 'Config',
                'ConfigError', 'HaltServer', 'load_config', 'main',
                'SETTINGS', '__version__'}
    assert expected <= set(names)
    for name in names:
        obj = getattr(processhandler, name)
        if isinstance(obj, type) and issubclass(obj, processhandler.Worker):
            assert obj.__module__ == processhandler.__name__


def test_pip_install_gives_a_console_script(tmp_path):
    """setup.py installs the module and a `processhandler` command that
    runs --version and check."""
    if not os.path.exists(os.path.join(HERE, 'setup.py')):
        pytest.skip('no setup.py yet')
    src = tmp_path / 'src'
    src.mkdir()
    for name in ('setup.py', 'processhandler.py', 'README.md'):
        if os.path.exists(os.path.join(HERE, name)):
            shutil.copy(os.path.join(HERE, name), str(src))
    target = tmp_path / 'target'
    # PEP 517 build: pip fetches setuptools and wheel into an isolated
    # build environment from the configured index.
    res = subprocess.run([PY, '-m', 'pip', 'install', '--no-deps',
                          '--use-pep517', '-q', '--target', str(target),
                          str(src)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=300)
    if res.returncode and ('No matching distribution' in res.stdout or
                           'Could not find a version' in res.stdout):
        pytest.skip('no package index for the build requirements')
    assert res.returncode == 0, res.stdout
    script = target / 'bin' / 'processhandler'
    assert script.exists(), os.listdir(str(target))
    env = dict(os.environ, PYTHONPATH=str(target))
    res = subprocess.run([str(script), '--version'], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert processhandler.__version__ in res.stdout + res.stderr
    proj = Project(tmp_path)
    proj.write_config()
    res = subprocess.run([str(script), '-c', proj.config, 'check'], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert 'ok' in res.stdout
    res = subprocess.run([str(script), '-c', proj.config, 'status'], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, cwd=str(tmp_path))
    assert res.returncode == 3
