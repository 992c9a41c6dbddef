"""Released weights: where each checkpoint this repository converts comes from (`RELEASES`), and a
download of a direct URL into a local cache with a checksum check.

`download(url, sha256)` keeps the file in `~/.cache/mobileformer/weights` (`$XDG_CACHE_HOME` is
honoured), under a folder named after the URL, so a second call reads it from there. The file is
written atomically: streamed into a temporary beside it, checked (every byte the server announced,
and the sha256 when one is known: all 64 hex digits, or a prefix of at least 8 as in timm's and
torch.hub's file names), then renamed; a failed or mismatching download leaves nothing behind.
A release without a known checksum is checked by loading it: every key and shape is compared with
the model (mobileformer.convert).
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from mobileformer.cache import user_cache

CHUNK = 1 << 20
TIMEOUT_S = 60  # per network operation, not for the whole download
MIN_SHA256_PREFIX = 8


def is_url(text: str) -> bool:
    return isinstance(text, str) and re.match(r'^https?://', text) is not None


def cached_path(url: str) -> str:
    """Where `download` keeps `url`: a folder per URL (many releases share a file name, such as
    model.safetensors), holding the file under its own name."""
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path)) or 'download'
    return user_cache('weights', hashlib.sha256(url.encode()).hexdigest()[:16], name)


def _check_sha256(expected: Optional[str]) -> Optional[str]:
    if expected is None:
        return None
    expected = expected.lower()
    if not re.fullmatch(r'[0-9a-f]{%d,64}' % MIN_SHA256_PREFIX, expected):
        raise ValueError(f'sha256 {expected!r} is not a checksum: give its 64 hex digits, or a prefix of at least '
                         f'{MIN_SHA256_PREFIX}')
    return expected


def _fetch(url: str, temporary: str) -> str:
    """Streams `url` into `temporary`; returns the sha256 of what arrived."""
    digest, received = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(temporary, 'wb') as f:
        announced = response.headers.get('Content-Length')
        for chunk in iter(lambda: response.read(CHUNK), b''):
            f.write(chunk)
            digest.update(chunk)
            received += len(chunk)
        if announced is not None and received != int(announced):
            raise ValueError(f"the download of '{url}' ended after {received} of {announced} bytes; try again")
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def download(url: str, sha256: Optional[str] = None, log: Callable[[str], None] = print) -> str:
    """The local path of `url`, downloaded into the cache unless it is there already, checked
    against `sha256` (full or a prefix) when given; any problem is one sentence (ValueError)."""
    expected = _check_sha256(sha256)
    path = cached_path(url)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f'{path}.{os.getpid()}.part'
    log(f"downloading '{url}' to '{path}'")
    try:
        actual = _fetch(url, temporary)
        if expected is not None and not actual.startswith(expected):
            raise ValueError(f"the download of '{url}' has sha256 {actual}, not the expected {expected}; it was "
                             'deleted: the release changed or the download is corrupt, so download it yourself and '
                             'pass its path')
        os.replace(temporary, path)
    except urllib.error.HTTPError as e:
        raise ValueError(f"cannot download '{url}': HTTP {e.code} {e.reason}; check the URL, or download the file "
                         'yourself and pass its path') from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, 'reason', None) or e
        raise ValueError(f"cannot download '{url}' ({reason}); check the URL and the network, or download the file "
                         'yourself and pass its path') from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    log(f"downloaded '{url}' ({os.path.getsize(path) / 1e6:.1f} MB)")
    return path


@dataclass(frozen=True)
class Release:
    """A released checkpoint of the model a config builds: a direct `url` that `download` fetches
    (with its sha256 or a prefix of it, when the release names one), or only a `page` to download it
    from by hand (pages behind a confirmation or a login)."""
    page: str
    converter: str  # the `-from` format of mobileformer.convert
    file: str  # the release's file name
    url: Optional[str] = None
    sha256: Optional[str] = None


_MOBILE_FORMER = 'https://github.com/AAboys/MobileFormer (Google Drive links per model)'
_REPMLP = 'https://github.com/DingXiaoH/RepMLP (Google Drive or Baidu Cloud)'
_TIMM = 'https://github.com/rwightman/pytorch-image-models/releases/download/'
_DEIT = 'https://dl.fbaipublicfiles.com/deit/'


def _timm(name: str, tag: str, path: str, sha256_prefix: str) -> Release:
    return Release(f'timm {name}.{tag} (Hugging Face hub: timm/{name}.{tag})', 'timm', os.path.basename(path),
                   _TIMM + path, sha256_prefix)


def _deit(file: str) -> Release:
    return Release('https://github.com/facebookresearch/deit (ResMLP)', 'deit-resmlp', file, _DEIT + file)


# Keyed by config name. Direct URLs and checksum prefixes are those timm's model registry names
# (timm/models/mlp_mixer.py: the GitHub release files carry the first 8 hex digits of their sha256,
# torch.hub's convention; the DeiT files carry none). The other sizes of each family have no release.
RELEASES: Dict[str, Release] = {
    **{f'mobileformer_{size}': Release(_MOBILE_FORMER, 'official-mobileformer', f'mobile-former-{size}.pth.tar')
       for size in ('26m', '52m', '96m', '151m', '214m', '294m', '508m')},
    'mixer_b16_224': _timm('mixer_b16_224', 'goog_in21k_ft_in1k', 'v0.1-vitjx/jx_mixer_b16_224-76587d61.pth', '76587d61'),
    'mixer_l16_224': _timm('mixer_l16_224', 'goog_in21k_ft_in1k', 'v0.1-vitjx/jx_mixer_l16_224-92f9adc4.pth', '92f9adc4'),
    'gmlp_s16_224': _timm('gmlp_s16_224', 'ra3_in1k', 'v0.1-weights/gmlp_s16_224_raa-10536d42.pth', '10536d42'),
    'resmlp_12_224': _deit('resmlp_12_no_dist.pth'),
    'resmlp_24_224': _deit('resmlp_24_no_dist.pth'),
    'resmlp_36_224': _deit('resmlp_36_no_dist.pth'),
    'resmlp_big_24_224': _deit('resmlpB_24_no_dist.pth'),
    'repmlpnet_b224': Release(_REPMLP, 'official-repmlpnet', 'RepMLPNet-B224-train.pth'),
    'repmlpnet_b256': Release(_REPMLP, 'official-repmlpnet', 'RepMLPNet-B256-train-acc8111.pth'),
    'repmlp_res50_light_224': Release(_REPMLP, 'official-repmlp', 'RepMLP-Res50-light-224_train.pth'),
}


def release_of(name: str) -> Release:
    """The release of the config `name` that `download` can fetch; otherwise one sentence saying
    where to get it by hand, or that there is none."""
    release = RELEASES.get(name)
    if release is None:
        raise ValueError(f"no released weights are known for '{name}'; released: {', '.join(sorted(RELEASES))}")
    if release.url is None:
        raise ValueError(f"the weights of '{name}' ({release.file}) are released at {release.page}, which needs a "
                         "download by hand; download it and pass its path as pretrained")
    return release
