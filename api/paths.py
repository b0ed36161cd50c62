"""Path parameters checked before any route runs: a UID that cannot exist is refused with a
reason (400), a collection name or share id that cannot exist is not found (404), so none ever
reaches SQL or the object store (a NUL byte, an encoded slash or `..`, a value of any length)."""

from __future__ import annotations

import re

from fastapi import Request

from carina.archive.collections import InvalidCollection, check_name
from carina.archive.errors import InvalidQuery, NotFound

# PS3.5 9.1: a UID is at most 64 characters, components of digits separated by periods. (No
# leading zero in a component is not enforced: a STOW path may carry a sender's original.)
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_MAX = 64
UID_PARAMS = ("study", "series", "sop")
_SHARE = re.compile(r"[0-9a-f]{16}")
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


async def check_path(request: Request) -> None:
    """Dependency of every data route: refuse path parameters that cannot name anything (no
    I/O: it runs on the event loop, not in a worker thread)."""
    params = request.path_params
    name = params.get("collection")
    if name is not None:
        try:
            check_name(name)
        except InvalidCollection:
            raise NotFound("no such collection") from None
    share, version = params.get("share"), params.get("version")
    if (share is not None and not _SHARE.fullmatch(share)) or (
        version is not None and not _VERSION.fullmatch(version)
    ):
        raise NotFound("no such share")
    for key in UID_PARAMS:
        value = params.get(key)
        if value is not None and (len(value) > _UID_MAX or not _UID.fullmatch(value)):
            raise InvalidQuery(f"the {key} in the path is not a UID (PS3.5 9.1)")
