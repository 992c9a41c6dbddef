"""Crash-safe checkpoint files.

`write_together` commits a set of files (weights, optimizer, EMA, the JSON record) as one unit with
a redo journal: every file is first written in full to a temporary next to its target and flushed
to disk; then a journal naming the renames is written atomically; then the renames happen and the
journal is deleted. A process killed at any point leaves either the previous set (the journal was
not written yet: `recover` deletes the temporaries) or the new one (`recover` finishes the renames),
never a mix of epochs or a half-written file.
"""
from __future__ import annotations

import errno
import json
import os
import re
from typing import Callable, Dict, List, Optional

import paddle

JOURNAL = 'checkpoint.journal'
_TEMPORARY = re.compile(r'\.tmp\d+$')


def _fsync(path: str) -> None:
    with open(path, 'rb+') as f:
        os.fsync(f.fileno())


def _write(obj, path: str, as_json: bool) -> None:
    """Writes `obj` (as JSON or with paddle.save) and flushes it to disk."""
    if as_json:
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=1)
    else:
        paddle.save(obj, path)
    _fsync(path)


def temporary_path(path: str) -> str:
    return f'{path}.tmp{os.getpid()}'


def write_file(obj, path: str) -> None:
    """Writes one file atomically: in full to a temporary next to `path`, flushed, then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = temporary_path(path)
    try:
        _write(obj, temporary, as_json=path.endswith('.json'))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_together(items: Dict[str, object], before_commit: Optional[Callable[[], None]] = None) -> None:
    """Commits every `{path: object}` at once (see the module docstring). All paths share a folder.
    On an error (e.g. a full disk) the temporaries are removed and the previous files stay.
    `before_commit` runs with every temporary written, just before the commit point."""
    folder = os.path.dirname(os.path.abspath(next(iter(items))))
    renames = {}
    try:
        for path, obj in items.items():
            renames[temporary_path(path)] = os.path.abspath(path)
            _write(obj, temporary_path(path), as_json=path.endswith('.json'))
        if before_commit is not None:
            before_commit()
        journal = os.path.join(folder, JOURNAL)
        _write(renames, temporary_path(journal), as_json=True)
        os.replace(temporary_path(journal), journal)  # the commit point
    except BaseException:
        for temporary in renames:
            if os.path.exists(temporary):
                os.remove(temporary)
        raise
    recover(folder)


def recover(folder: str) -> List[str]:
    """Completes a commit whose journal exists and deletes temporaries of an uncommitted one;
    returns the files it renamed into place (empty when there was nothing to finish)."""
    journal = os.path.join(folder, JOURNAL)
    renamed = []
    if os.path.exists(journal):
        with open(journal, encoding='utf-8') as f:
            renames = json.load(f)
        for temporary, target in renames.items():
            if os.path.exists(temporary):  # absent: renamed before the interruption
                os.replace(temporary, target)
                renamed.append(target)
        os.remove(journal)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if _TEMPORARY.search(name):
                os.remove(os.path.join(folder, name))
    return renamed


def check_writable(folder: str) -> None:
    """Creates `folder` and writes, flushes and deletes a small file in it, so a read-only folder or
    a full disk is reported before training starts rather than at the first checkpoint."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OSError(f"the output folder '{folder}' is a file; pass -output with a folder") from None
    probe = os.path.join(folder, temporary_path('.write_test'))
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, 'wb') as f:
            f.write(b'\0' * 65536)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        remedy = ('free disk space or pass -output with a folder on another disk'
                  if e.errno in (errno.ENOSPC, errno.EDQUOT) else 'pass -output with a writable folder')
        raise OSError(f"cannot write to the output folder '{folder}' ({e.strerror or e}); {remedy}") from None
