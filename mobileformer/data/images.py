"""Opening a user's image file: the one reader of predict.py, the folder datasets and INT8 calibration.

A file that cannot be decoded (not an image, truncated) and a file whose header declares more
pixels than PIL opens safely (`PIL.Image.MAX_IMAGE_PIXELS`, a guard against decompression bombs: a
few bytes that would decode to gigabytes) are both refused in one ValueError sentence naming the
file; the datasets then apply DATA.SKIP_BAD_IMAGES to it like to any bad image.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

from PIL import Image

# PIL warns about images between its limit and twice it and refuses larger ones; open_image refuses
# both, so the warning would only repeat what the error says
warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)

_PIXELS_IN_MESSAGE = re.compile(r'\((\d+) pixels\)')  # PIL's "Image size (900000000 pixels) exceeds ..."


def too_many_pixels(path: str, pixels: Optional[int]) -> str:
    """The sentence for an image over PIL's pixel limit (`pixels`: what its header declares, if known)."""
    declared = f'{pixels:,} pixels' if pixels is not None else 'more pixels'
    return (f"image '{path}' declares {declared}, more than PIL's limit of {Image.MAX_IMAGE_PIXELS:,} (a guard "
            'against decompression bombs); remove or replace the file')


def _unreadable(path: str, error: Exception) -> ValueError:
    if isinstance(error, Image.DecompressionBombError):  # over twice the limit: PIL refuses it itself
        found = _PIXELS_IN_MESSAGE.search(str(error))
        return ValueError(too_many_pixels(path, int(found.group(1)) if found else None))
    return ValueError(f"cannot read image '{path}' ({error}); remove or replace the file")


def open_image(path: str) -> Image.Image:
    """The decoded image at `path`; a ValueError in one sentence naming the file when it cannot be
    decoded or declares more pixels than PIL's limit (checked before anything is decoded)."""
    try:
        image = Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _unreadable(path, e) from None
    with image:
        width, height = image.size
        if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
            raise ValueError(too_many_pixels(path, width * height))
        try:
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise _unreadable(path, e) from None
    return image
