"""Where this package keeps what it measures or downloads once per machine."""
import os


def user_cache(*parts: str) -> str:
    """A path under this package's cache folder: `$XDG_CACHE_HOME/mobileformer` or `~/.cache/mobileformer`."""
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(root, 'mobileformer', *parts)
