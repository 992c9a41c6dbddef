"""MKL's AVX2 request on AMD CPUs (mobileformer/cpu.py): decided from /proc/cpuinfo, never overriding the user."""
import pytest

from mobileformer.cpu import prefer_mkl_avx2_on_amd

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
