"""Smoke test of the benchmark harness (bench/run.py): it runs and prints
its table.  Benchmarks are never pass/fail: no timing is asserted."""
import os
import subprocess

from test_processhandler import HERE, PY

BENCH = os.path.join(HERE, 'bench', 'run.py')


def test_bench_smoke_runs_and_prints_table():
    res = subprocess.run(
        [PY, BENCH, '--smoke', '--systems', 'processhandler',
         '--python', PY],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=300,
        cwd=HERE)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert '| metric ' in res.stdout and 'respawn latency' in res.stdout, \
        res.stdout[-3000:]
