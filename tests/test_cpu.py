"""mobileformer/cpu.py: MKL's AVX2 request on AMD CPUs (from /proc/cpuinfo, never overriding the
user), and what importing the package sets up for any script (threads, reused buffers, a quiet
Paddle log), each overridden by the user's own setting."""
import os

import paddle
import pytest

from mobileformer.cpu import cpu_threads, prefer_mkl_avx2_on_amd

AMD = 'processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n'
AMD_NO_AVX2 = 'processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx\n'
INTEL = 'processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n'


@pytest.mark.parametrize('cpuinfo, expected', [(AMD, {'MKL_DEBUG_CPU_TYPE': '5'}), (AMD_NO_AVX2, {}), (INTEL, {})])
def test_only_amd_with_avx2_gets_the_request(tmp_path, cpuinfo, expected):
    path = tmp_path / 'cpuinfo'
    path.write_text(cpuinfo)
    environ = {}
    assert prefer_mkl_avx2_on_amd(environ, str(path)) == bool(expected)
    assert environ == expected


def test_user_setting_wins_and_missing_cpuinfo_is_harmless(tmp_path):
    path = tmp_path / 'cpuinfo'
    path.write_text(AMD)
    environ = {'MKL_DEBUG_CPU_TYPE': '0'}
    assert not prefer_mkl_avx2_on_amd(environ, str(path))
    assert environ == {'MKL_DEBUG_CPU_TYPE': '0'}
    environ = {}
    assert not prefer_mkl_avx2_on_amd(environ, str(tmp_path / 'absent'))
    assert environ == {}


def test_cpu_threads_default_to_every_cpu_shared_among_local_ranks():
    cpus = len(os.sched_getaffinity(0))
    assert cpu_threads({}) == cpus
    assert cpu_threads({'PADDLE_LOCAL_SIZE': '2'}) == max(1, cpus // 2)
    assert cpu_threads({'PADDLE_LOCAL_SIZE': str(4 * cpus)}) == 1
    assert cpu_threads({'OMP_NUM_THREADS': '3', 'PADDLE_LOCAL_SIZE': '2'}) == 3  # the user's choice wins
    assert cpu_threads({'OMP_NUM_THREADS': 'many'}) == cpus


def test_use_cpu_threads_sets_paddles_threads(monkeypatch):
    from mobileformer import cpu

    chosen = []
    monkeypatch.setattr(paddle.base.core, 'set_num_threads', chosen.append)
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert cpu.use_cpu_threads() == 3
    assert chosen == [3]


def test_keep_freed_memory_applies_through_glibc_unless_the_user_tuned_malloc():
    from mobileformer.cpu import keep_freed_memory

    assert keep_freed_memory({})  # glibc accepted both mallopt settings
    assert not keep_freed_memory({'MALLOC_MMAP_THRESHOLD_': '0'})
    assert not keep_freed_memory({'MALLOC_TRIM_THRESHOLD_': '0'})
    assert not keep_freed_memory({'MALLOC_MMAP_MAX_': '65536'})
    assert not keep_freed_memory({}, libc_name='libdoes-not-exist.so')


@pytest.mark.parametrize('user_value, expected', [(None, len(os.sched_getaffinity(0))), ('1', 1)])
def test_paddles_own_omp_default_is_not_taken_for_the_users(user_value, expected):
    """Importing Paddle sets OMP_NUM_THREADS=1 when it is unset; importing mobileformer removes it
    again, so that commands (and the processes they or a script start) use every CPU, while a value
    the process started with is the user's."""
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    if user_value is not None:
        env['OMP_NUM_THREADS'] = user_value
    code = ('import paddle, os; import mobileformer; from mobileformer.cpu import cpu_threads, use_cpu_threads, users_environ; '
            'print(os.environ.get("OMP_NUM_THREADS", "unset"), cpu_threads(users_environ()), use_cpu_threads())')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-3:] == [user_value or 'unset', str(expected), str(expected)]


def test_only_paddles_omp_default_is_forgotten():
    from mobileformer.cpu import forget_paddles_omp_default

    environ = {'OMP_NUM_THREADS': '3'}
    assert not forget_paddles_omp_default(environ)
    assert environ == {'OMP_NUM_THREADS': '3'}
    assert not forget_paddles_omp_default({})


AMD_AVX512 = 'processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n'


@pytest.mark.parametrize('cpuinfo, environ', [(INTEL, {}), (AMD, {}), (AMD_AVX512, {'ONEDNN_MAX_CPU_ISA': 'AVX512_CORE'}),
                                              (AMD_AVX512, {'DNNL_MAX_CPU_ISA': 'AVX2'})])
def test_onednn_isa_is_left_alone_off_amd_avx512_or_when_the_user_chose(tmp_path, cpuinfo, environ):
    from mobileformer.cpu import cap_onednn_isa_on_amd_avx512

    path = tmp_path / 'cpuinfo'
    path.write_text(cpuinfo)
    assert not cap_onednn_isa_on_amd_avx512(environ, str(path), library='libdoes-not-exist.so')


def test_onednn_isa_cap_applies_before_the_first_kernel_only(tmp_path):
    """In a fresh process: Paddle's oneDNN takes the AVX2 cap, then reports AVX2 (0x7) as its ISA,
    and a second request is refused because the ISA is fixed by then."""
    import subprocess
    import sys

    from conftest import ROOT

    path = tmp_path / 'cpuinfo'
    path.write_text(AMD_AVX512)
    code = ('import ctypes, os, paddle; from mobileformer.cpu import cap_onednn_isa_on_amd_avx512 as cap; '
            f'first = cap({{}}, {str(path)!r}); '
            'lib = ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), "libs", "libdnnl.so.3")); '
            'print(first, lib.dnnl_get_effective_cpu_isa() <= 0x7, cap({}, ' + repr(str(path)) + '))')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-3:] == ['True', 'True', 'False']


def _run_script(code: str, env_changes: dict, drop=('OMP_NUM_THREADS', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_',
                                                    'MALLOC_MMAP_MAX_', 'GLOG_minloglevel')):
    """`code` run as a user's own script: a fresh interpreter, the user's environment plus `env_changes`."""
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_changes)
    return subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=300)


# Paddle's threads (from its OpenMP runtime) and the minor page faults of the last of five rounds
# of two element-wise ops on an 8 MB and on a 64 MB tensor: the 8 MB rounds free 16 MB at once,
# which glibc's default trim threshold gives back to the OS (4096 pages faulted in again per
# round); the 64 MB ones are above the highest mmap threshold glibc takes (32 MiB), so by default
# each result is a fresh mapping (32768 pages per round).
_THREADS_AND_FAULTS = '''
import ctypes, os, resource
import paddle
import mobileformer
omp = ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), 'libs', 'libiomp5.so'))
faults = []
for x in (paddle.ones([2 << 20]), paddle.ones([16 << 20])):
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = x * 2
        z = y + 1
        del y, z
        last = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults.append(last)
print(omp.omp_get_max_threads(), *faults)
'''


def test_a_plain_script_runs_on_every_cpu_and_reuses_freed_buffers():
    threads, small, large = map(int, _run_script(_THREADS_AND_FAULTS, {}).stdout.split()[-3:])
    assert threads == len(os.sched_getaffinity(0))
    assert small < 64  # was 4096: 16 MB paged in again
    assert large < 64  # was 32768: two fresh 64 MB mappings


def test_the_users_threads_and_malloc_settings_win_in_a_script():
    out = _run_script(_THREADS_AND_FAULTS, {'OMP_NUM_THREADS': '1', 'MALLOC_TRIM_THRESHOLD_': '0'}).stdout
    threads, small, large = map(int, out.split()[-3:])
    assert threads == 1
    assert small >= 4096  # glibc trims as the user asked: both 8 MB buffers fault in again
    assert large >= 32768  # and maps the 64 MB ones afresh


_EXPORT = '''
{imports}
from mobileformer import build_model, get_config
backbone = build_model(get_config('configs/mobileformer_26m.yaml'), features_only=True)
paddle.jit.save(backbone, {prefix!r}, input_spec=[paddle.static.InputSpec([None, 3, 224, 224], 'float32', 'x')])
print('saved')
'''
_CCACHE_WARNING = ('No ccache found', 'warnings.warn(warning_message)')


@pytest.mark.parametrize('imports', ['import paddle\nimport mobileformer', 'import mobileformer\nimport paddle'])
def test_a_scripts_export_prints_no_paddle_log_whatever_the_import_order(tmp_path, imports):
    """The README's backbone example: Paddle's glog line at `paddle.jit.save` ("Paddle static
    graph(PIR) not support input out tensor") is silenced also where Paddle was imported first (its
    ccache warning is then printed by `import paddle` itself, before any code of the package runs)."""
    run = _run_script(_EXPORT.format(imports=imports, prefix=str(tmp_path / 'backbone')), {})
    assert run.stdout == 'saved\n'
    noise = [line for line in run.stderr.splitlines() if not any(part in line for part in _CCACHE_WARNING)]
    assert noise == []
    if imports.startswith('import mobileformer'):
        assert run.stderr == ''


def test_a_users_glog_level_wins(tmp_path):
    run = _run_script(_EXPORT.format(imports='import paddle\nimport mobileformer', prefix=str(tmp_path / 'b')),
                      {'GLOG_minloglevel': '0'})
    assert 'not support input out tensor' in run.stderr
