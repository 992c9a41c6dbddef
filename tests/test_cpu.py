"""mobileformer/cpu.py: MKL's AVX2 request on AMD CPUs (from /proc/cpuinfo, never overriding the
user) and the CPU thread count every command sets."""
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


def test_commands_set_paddle_threads(monkeypatch):
    from mobileformer import cli, cpu

    chosen = []
    monkeypatch.setattr(paddle.base.core, 'set_num_threads', chosen.append)
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    cli.run(lambda argv: None, [])
    assert chosen == [3]
    assert cpu.use_cpu_threads() == 3


def test_keep_freed_memory_applies_through_glibc_unless_the_user_tuned_malloc():
    from mobileformer.cpu import keep_freed_memory

    assert keep_freed_memory({})  # glibc accepted both mallopt settings
    assert not keep_freed_memory({'MALLOC_MMAP_THRESHOLD_': '0'})
    assert not keep_freed_memory({'MALLOC_TRIM_THRESHOLD_': '0'})
    assert not keep_freed_memory({}, libc_name='libdoes-not-exist.so')
