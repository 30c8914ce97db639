"""Config fuzzing: whatever the INI file or --set says, the answer is a
ConfigError with one line (CLI: exit 2, one stderr line), never another
exception, a traceback or a hang."""
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import processhandler
from test_processhandler import PH, PY

KEYS = [s.name for s in processhandler.SETTINGS]

# Values chosen to break parsers: numbers of every size and sign, unicode,
# interpolation syntax and loops, control characters.
values = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-10 ** 30, max_value=10 ** 30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(['', 'true', 'no', '%(base_path)s', '%(nope)s', '%', '%%',
                     '%(loop)s', '0x10', '1e999', '-0', '0,2-3', '3-1',
                     '[::1]:80', 'unix:', 'redis://', 'file:', 'a:b:c',
                     '\u00e9\u4e2d', '\x00', '99999999999999999999']),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(
    alphabet='abcdefghijklmnopqrstuvwxyz_', min_size=1, max_size=16))


def ini(sections):
    out = []
    for name, items in sections:
        out.append('[%s]' % name)
        out.extend('%s = %s' % (k, v.replace('\n', ' ')) for k, v in items)
    return '\n'.join(out) + '\n'


sections = st.lists(st.tuples(
    st.text(alphabet='abcdefghijklmnopqrstuvwxyz_-DEFAULT', min_size=1,
            max_size=10),
    st.lists(st.tuples(keys, values), max_size=8)), min_size=0, max_size=3)


def only_config_errors(path, section=None, overrides=()):
    try:
        processhandler.load_config(path, section, overrides)
    except processhandler.ConfigError as e:
        msg = str(e)
        assert msg and '\n' not in msg, repr(msg)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sections=sections, loop=st.booleans())
def test_fuzz_ini_files_give_config_errors_only(tmp_path, sections, loop):
    text = ini(sections)
    if loop:
        text += '[DEFAULT]\nloop = %(loop2)s\nloop2 = %(loop)s\n'
    path = tmp_path / 'fuzz.ini'
    path.write_text(text, encoding='utf-8', errors='surrogatepass')
    only_config_errors(str(path))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(keys, values), max_size=5),
       raw=st.lists(st.text(max_size=20), max_size=3))
def test_fuzz_set_overrides_give_config_errors_only(tmp_path, pairs, raw):
    path = tmp_path / 'ok.ini'
    path.write_text('[job]\nworker_class = m:C\n')
    only_config_errors(str(path), None,
                       ['%s=%s' % kv for kv in pairs] + list(raw))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_fuzz_binary_garbage(tmp_path, data):
    path = tmp_path / 'garbage.ini'
    path.write_bytes(data)
    only_config_errors(str(path))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sections=sections, data=st.binary(max_size=80),
       command=st.sampled_from(['check', 'start', 'status', 'stop']))
def test_fuzz_cli_exits_2_with_one_line(tmp_path, sections, data, command):
    """Through the real CLI: a bad config is exit 2 and one stderr line;
    a config that parses never gets a traceback either."""
    path = tmp_path / 'cli.ini'
    path.write_bytes(ini(sections).encode('utf-8', 'surrogatepass') + data)
    try:
        processhandler.load_config(str(path))
        bad = False
    except processhandler.ConfigError:
        bad = True
    if not bad and command == 'start':
        command = 'check'      # a config that parses could really start
    res = subprocess.run([PY, PH, '-c', str(path), command],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=60,
                         cwd=str(tmp_path))
    assert 'Traceback' not in res.stderr.decode('utf-8', 'replace')
    if bad:
        assert res.returncode == 2, res.stderr
        assert len(res.stderr.decode('utf-8', 'replace').strip()
                   .splitlines()) == 1, res.stderr
