"""Released weights: the download into the cache (checksum, atomic write, one sentence per problem)
against an HTTP server on 127.0.0.1 serving the test fixtures (nothing leaves this machine), and
create_model / mobileformer.convert fed by a URL."""
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest
from conftest import FIXTURES

from mobileformer import create_model, get_config
from mobileformer import convert as convert_module
from mobileformer import weights
from mobileformer.checkpoint import read_state_dict
from mobileformer.convert import convert_checkpoint
from mobileformer.registry import converters

FIXTURE = 'timm_mixer_tiny.pth'


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests = []  # the paths asked for, in order

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=FIXTURES, **kwargs)

    def do_GET(self):
        _Handler.requests.append(self.path)
        if self.path == '/truncated.pth':  # announces the whole fixture, sends half of it
            data = open(os.path.join(FIXTURES, FIXTURE), 'rb').read()
            self.send_response(200)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The base URL of a server of tests/fixtures on 127.0.0.1; the cache in tmp_path."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    _Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def sha256_of(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def cache_files(tmp_path):
    root = tmp_path / 'cache' / 'mobileformer' / 'weights'
    return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file()) if root.exists() else []


@pytest.mark.timeout(60)
def test_download_is_cached_and_checked(server, tmp_path):
    fixture = os.path.join(FIXTURES, FIXTURE)
    url = f'{server}/{FIXTURE}'
    lines = []
    path = weights.download(url, sha256_of(fixture), log=lines.append)
    assert path == str(tmp_path / 'cache' / 'mobileformer' / 'weights' /
                       hashlib.sha256(url.encode()).hexdigest()[:16] / FIXTURE)
    assert open(path, 'rb').read() == open(fixture, 'rb').read()
    assert lines[0] == f"downloading '{url}' to '{path}'" and lines[1].startswith(f"downloaded '{url}' (")
    # a second call reads the cache: the server sees no new request
    assert weights.download(url, sha256_of(fixture)[:8], log=lines.append) == path
    assert _Handler.requests == [f'/{FIXTURE}'] and len(lines) == 2


@pytest.mark.timeout(60)
def test_a_wrong_checksum_is_one_sentence_and_leaves_no_file(server, tmp_path):
    url = f'{server}/{FIXTURE}'
    actual = sha256_of(os.path.join(FIXTURES, FIXTURE))
    with pytest.raises(ValueError) as error:
        weights.download(url, '0' * 64, log=lambda line: None)
    assert str(error.value) == (f"the download of '{url}' has sha256 {actual}, not the expected {'0' * 64}; it was "
                                'deleted: the release changed or the download is corrupt, so download it yourself '
                                'and pass its path')
    assert cache_files(tmp_path) == []


@pytest.mark.timeout(60)
def test_failed_downloads_are_one_sentence_and_leave_no_file(server, tmp_path):
    with pytest.raises(ValueError) as error:
        weights.download(f'{server}/missing.pth', log=lambda line: None)
    assert str(error.value) == (f"cannot download '{server}/missing.pth': HTTP 404 File not found; check the URL, "
                                'or download the file yourself and pass its path')
    with pytest.raises(ValueError) as error:
        weights.download(f'{server}/truncated.pth', log=lambda line: None)
    size = os.path.getsize(os.path.join(FIXTURES, FIXTURE))
    assert str(error.value) == (f"the download of '{server}/truncated.pth' ended after {size // 2} of {size} bytes; "
                                'try again')
    with pytest.raises(ValueError, match=r"^sha256 'abc' is not a checksum: give its 64 hex digits, or a prefix of "
                                         r"at least 8$"):
        weights.download(f'{server}/{FIXTURE}', 'abc')
    assert cache_files(tmp_path) == []


@pytest.mark.timeout(120)
def test_create_model_and_convert_take_a_url(server, tmp_path, capsys):
    """The weights arrive converted exactly as from the local file."""
    cfg = os.path.join(FIXTURES, 'timm_mixer_tiny.yaml')
    local = convert_checkpoint(os.path.join(FIXTURES, FIXTURE), get_config(cfg), str(tmp_path / 'local.pdparams'))
    model = create_model(cfg, pretrained=f'{server}/{FIXTURE}')
    assert not model.training
    for name, value in local.items():
        np.testing.assert_array_equal(model.state_dict()[name].numpy(), value, err_msg=name)
    out = str(tmp_path / 'from_url.pdparams')
    assert convert_module.main([f'{server}/{FIXTURE}', '-cfg', cfg, '-output', out, '-sha256',
                                sha256_of(os.path.join(FIXTURES, FIXTURE))]) in (0, None)
    for name, value in read_state_dict(out).items():
        np.testing.assert_array_equal(value, local[name], err_msg=name)
    assert _Handler.requests == [f'/{FIXTURE}']  # the second use came from the cache


def test_pretrained_true_names_the_release_or_says_where_to_get_it(monkeypatch, server):
    with pytest.raises(ValueError) as error:
        create_model('mobileformer_26m', pretrained=True)
    assert str(error.value) == ("the weights of 'mobileformer_26m' (mobile-former-26m.pth.tar) are released at "
                                'https://github.com/AAboys/MobileFormer (Google Drive links per model), which needs a '
                                'download by hand; download it and pass its path as pretrained')
    with pytest.raises(ValueError, match=r"^no released weights are known for 'mixer_s16_224'; released: gmlp_s16_224, "):
        create_model('mixer_s16_224', pretrained=True)
    # a release with a direct URL is downloaded (here served locally) and checked by its sha256 prefix
    fixture = os.path.join(FIXTURES, FIXTURE)
    cfg = os.path.join(FIXTURES, 'timm_mixer_tiny.yaml')
    monkeypatch.setitem(weights.RELEASES, cfg, weights.Release('test', 'timm', FIXTURE, f'{server}/{FIXTURE}',
                                                               sha256_of(fixture)[:8]))
    assert create_model(cfg, pretrained=True).get_classifier().weight.shape == [32, 10]
    monkeypatch.setitem(weights.RELEASES, cfg, weights.Release('test', 'timm', FIXTURE, f'{server}/{FIXTURE}?v=2',
                                                               '12345678'))
    with pytest.raises(ValueError, match=r"has sha256 [0-9a-f]{64}, not the expected 12345678; it was deleted"):
        create_model(cfg, pretrained=True)


def test_every_release_names_a_config_and_a_converter_that_exist():
    for name, release in weights.RELEASES.items():
        config = get_config(name)
        assert config.MODEL.TYPE in converters()[release.converter].model_types, name
        assert release.url is None or release.url.startswith('https://'), name
        assert release.sha256 is None or len(release.sha256) >= weights.MIN_SHA256_PREFIX, name
