"""The curator page's redaction and edit forms in Debian's chromium (Playwright), the issue's
flow: log in, open the queue, view a held series with text burned into its pixels, draw a
rectangle over the text, redact, release, and find the series over QIDO with the region blank
in what WADO-RS (dicomweb-client) returns and every other pixel as sent; reject another and
see it gone; edit an attribute from the header table; refusals shown as pages saying why."""

from __future__ import annotations

import re

import numpy as np
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import Server
from tests.factory import TEXT_REGION, text_series
from tests.test_curator_web import (  # noqa: F401 - fixtures used by name
    browser,
    curator,
    log_in,
    logged_in,
    page_url,
    series_in_qido,
)

pytestmark = pytest.mark.slow
COLUMNS = 64


def drag(page: Page, start: tuple[int, int], end: tuple[int, int]) -> None:
    """A mouse drag on the frame viewer between two image pixels (column, row)."""
    box = page.locator("#redact-canvas").bounding_box()
    assert box is not None
    scale = box["width"] / COLUMNS

    def at(pixel: tuple[int, int]) -> tuple[float, float]:
        return box["x"] + (pixel[0] + 0.5) * scale, box["y"] + (pixel[1] + 0.5) * scale

    page.mouse.move(*at(start))
    page.mouse.down()
    page.mouse.move(*at(((start[0] + end[0]) // 2, (start[1] + end[1]) // 2)), steps=3)
    page.mouse.move(*at(end), steps=3)
    page.mouse.up()


def test_curator_redacts_releases_rejects_and_edits_in_a_browser(
    server: Server,
    curator: str,  # noqa: F811
    browser: Browser,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    shots = tmp_path_factory.mktemp("screenshots")
    sent = text_series(2)
    study, series, _ = server.store(sent)
    other_study, other, _ = server.store(text_series(1))
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()

    log_in(page, server, curator)
    expect(page).to_have_url(page_url(server, "/queue"))
    expect(page.locator(f"tr[data-series='{series}']")).to_contain_text("burned-in-annotation")
    page.screenshot(path=str(shots / "queue.png"), full_page=True)

    page.click(f"a[href='/curation/series/{series}']")
    page.wait_for_function(
        "() => { const i = document.getElementById('frame-image');"
        " return i.complete && i.naturalWidth === 64; }"
    )
    # Draw a rectangle around the burned-in text (rows 4-11, columns 4-43) and redact it in
    # every instance of the series.
    y, x, height, width = TEXT_REGION
    expect(page.locator("#apply-redaction")).to_be_disabled()
    page.check("#draw")
    drag(page, (x - 1, y - 1), (x + width + 1, y + height + 1))
    expect(page.locator("#rect-list")).to_contain_text("×")
    page.screenshot(path=str(shots / "series.png"), full_page=True)
    page.check("#redact input[name=scope][value=series]")
    page.fill("#redact input[name=reason]", "site name burned in")
    page.click("#apply-redaction")
    expect(page.locator("table.audit")).to_contain_text("redact")
    page.screenshot(path=str(shots / "series-redacted.png"), full_page=True)

    # The rectangle as recorded covers the text; release, and the series is published.
    view = server.http.get(f"{server.url}/api/curation/series/{series}", timeout=30).json()
    [redaction] = [a for a in view["audit"] if a["action"] == "redact"]
    assert (
        redaction["actor"].startswith("web-curator") and len(redaction["after"]["instances"]) == 2
    )
    [rect] = redaction["after"]["rectangles"]
    assert rect["x"] <= x and rect["y"] <= y
    assert rect["x"] + rect["width"] >= x + width and rect["y"] + rect["height"] >= y + height
    assert series not in series_in_qido(server, study)
    page.fill("#release input[name=reason]", "text redacted")
    page.click("#release button")
    expect(page.locator("#state")).to_have_text("published")

    # Over DICOMweb: in QIDO, and WADO-RS gives the region blank and the rest as sent.
    assert series in series_in_qido(server, study)
    got = {int(ds.InstanceNumber): ds for ds in server.client().retrieve_series(study, series)}
    mask = np.zeros((64, 64), bool)
    mask[rect["y"] : rect["y"] + rect["height"], rect["x"] : rect["x"] + rect["width"]] = True
    for original in sent:
        pixels = got[int(original.InstanceNumber)].pixel_array
        assert (pixels[mask] == pixels.min()).all() and pixels.min() == -32768
        assert (pixels[~mask] == original.pixel_array[~mask]).all()
        assert got[int(original.InstanceNumber)].BurnedInAnnotation == "NO"

    # Edit from the header table of the other held series: click a row, give a value.
    page.goto(page_url(server, f"/series/{other}"))
    page.click("table.header tr[data-path='Manufacturer']")
    expect(page.locator("#edit-attribute")).to_have_value("Manufacturer")
    page.fill("#edit-value", "ACME IMAGING")
    page.fill("#edit input[name=reason]", "vendor name normalised")
    page.click("#edit button[type=submit]")
    expect(page.locator("tr[data-path='Manufacturer'] td.value")).to_have_text("ACME IMAGING")
    # An edit that would make the object invalid is a page saying why, and changes nothing.
    page.fill("#edit-attribute", "Rows")
    page.fill("#edit-value", "8")
    page.fill("#edit input[name=reason]", "try")
    page.click("#edit button[type=submit]")
    expect(page.locator("main")).to_contain_text("describes the pixel data")
    page.go_back()

    # Reject it: gone from QIDO.
    page.goto(page_url(server, f"/series/{other}"))
    page.fill("#reject input[name=reason]", "face visible")
    page.click("#reject button")
    expect(page.locator("#state")).to_have_text("rejected")
    assert other not in series_in_qido(server, other_study)
    context.close()


def test_page_redaction_without_csrf_or_rectangles_is_refused(
    server: Server,
    curator: str,  # noqa: F811
) -> None:
    _, series, sop = server.store(text_series(1))
    s, csrf = logged_in(server, curator)
    form = {"reason": "r", "sop": sop, "rectangles": "4,4,8,8", "frame": "1"}
    r = s.post(page_url(server, f"/series/{series}/redact"), data=form, timeout=30)
    assert r.status_code == 403 and "CSRF" in r.text
    for rectangles, said in (("", "draw at least one"), ("4,4,0,8", "greater than"),
                             ("60,4,8,8", "outside the 64x64")):  # fmt: skip
        data = {**form, "csrf": csrf, "rectangles": rectangles}
        r = s.post(page_url(server, f"/series/{series}/redact"), data=data, timeout=30)
        assert r.status_code == 422 and re.search(said, r.text), r.text
    r = s.post(
        page_url(server, f"/series/{series}/redact"), data={**form, "csrf": csrf}, timeout=30
    )
    assert r.status_code == 200 and "redact" in r.text
