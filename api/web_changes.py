"""The curator page's redaction and edit forms (the series view, api/templates/changes.html):
rectangles drawn on the frame viewer blanked in this frame or every frame, of this instance or
the whole series; one attribute of the header set or removed. Posted with the session's CSRF
token, checked and applied by the same functions as the REST routes (api/changes.py)."""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ValidationError

from carina.curation.errors import ChangeRefused

from .changes import EditIn, RectangleIn, RedactionIn, run_edit, run_redaction
from .web import PREFIX, LoggedIn, check_csrf

# "x,y,width,height;x,y,width,height": the rectangles the page's canvas collected.
_RECTANGLE = re.compile(r"\s*(\d+),(\d+),(\d+),(\d+)\s*")
Scope = Literal["instance", "series"]
M = TypeVar("M", bound=BaseModel)


def router() -> APIRouter:
    """The page's change routes (registered before web's /series/{uid}/{decision})."""
    r = APIRouter(prefix=PREFIX, include_in_schema=False)

    @r.post("/series/{series_uid}/redact")
    def redact(
        request: Request,
        session: LoggedIn,
        series_uid: str,
        reason: Annotated[str, Form(min_length=1, max_length=2000)],
        sop: Annotated[str, Form(max_length=64)],
        rectangles: Annotated[str, Form(max_length=4000)] = "",
        frame: Annotated[int, Form(ge=1)] = 1,
        frames: Annotated[Literal["this", "all"], Form()] = "this",
        scope: Annotated[Scope, Form()] = "instance",
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        check_csrf(session, csrf)
        body = _valid(
            RedactionIn,
            reason=reason,
            rectangles=_rectangles(rectangles),
            frames=[frame] if frames == "this" else None,
            instances=[sop] if scope == "instance" else None,
        )
        run_redaction(request, series_uid, body)
        return _back(series_uid, sop)

    @r.post("/series/{series_uid}/edit")
    def edit(
        request: Request,
        session: LoggedIn,
        series_uid: str,
        reason: Annotated[str, Form(min_length=1, max_length=2000)],
        attribute: Annotated[str, Form(min_length=1, max_length=64)],
        sop: Annotated[str, Form(max_length=64)],
        action: Annotated[Literal["set", "remove"], Form()] = "set",
        value: Annotated[str, Form(max_length=10000)] = "",
        scope: Annotated[Scope, Form()] = "series",
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        check_csrf(session, csrf)
        body = _valid(
            EditIn,
            reason=reason,
            attribute=attribute,
            action=action,
            # Several values are typed as DICOM writes them: separated by backslashes.
            value=value.split("\\") if "\\" in value else value,
            instance=sop if scope == "instance" else None,
        )
        run_edit(request, series_uid, body)
        return _back(series_uid, sop)

    return r


def _rectangles(text: str) -> list[RectangleIn]:
    """The rectangles of the form's field; ChangeRefused when there is none or one is bad."""
    parts = [p for p in text.split(";") if p.strip()]
    if not parts:
        raise ChangeRefused("draw at least one rectangle on the frame")
    found = []
    for part in parts:
        m = _RECTANGLE.fullmatch(part)
        if m is None:
            raise ChangeRefused(f"{part!r} is not a rectangle x,y,width,height")
        x, y, w, h = map(int, m.groups())
        found.append(_valid(RectangleIn, x=x, y=y, width=w, height=h))
    return found


def _valid(model: type[M], **fields: object) -> M:
    """The model built from the form's fields; ChangeRefused (422) saying what is wrong."""
    try:
        return model(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ChangeRefused(f"{where}: {first['msg']}") from None


def _back(series_uid: str, sop: str) -> Response:
    return RedirectResponse(
        f"{PREFIX}/series/{series_uid}?sop={quote(sop, safe='')}", status_code=303
    )
