-- What curators changed in held series (issue #6): pixel redactions and attribute edits, one
-- row per instance changed, so the change can be shown, audited and applied again to the same
-- instance after it is de-identified anew (a reprocess from its original). Rows name instances
-- by their de-identified UIDs; they go with their series (erasure, for one, deletes it).

CREATE TABLE pixel_redactions (
    pk         bigserial PRIMARY KEY,
    series_uid text NOT NULL REFERENCES series (series_uid) ON DELETE CASCADE,
    sop_uid    text NOT NULL,
    -- 1-based frame numbers; NULL: every frame of the instance.
    frames     integer[],
    -- [{"x": column, "y": row, "width": w, "height": h}, ...] in pixels, 0-based from the
    -- top left corner of the frame.
    rectangles jsonb NOT NULL,
    actor      text NOT NULL,
    reason     text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pixel_redactions_series ON pixel_redactions (series_uid);

CREATE TABLE attribute_edits (
    pk         bigserial PRIMARY KEY,
    series_uid text NOT NULL REFERENCES series (series_uid) ON DELETE CASCADE,
    sop_uid    text NOT NULL,
    -- The top-level attribute, as 8 hex digits (DICOM JSON key), and its keyword.
    tag        text NOT NULL CHECK (tag ~ '^[0-9A-F]{8}$'),
    keyword    text NOT NULL,
    action     text NOT NULL CHECK (action IN ('set', 'remove')),
    -- The element set, in DICOM JSON ({"vr": ..., "Value": [...]}); NULL for a removal. The
    -- value it replaced is not kept: it may be the very PHI the edit took out.
    element    jsonb,
    actor      text NOT NULL,
    reason     text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX attribute_edits_series ON attribute_edits (series_uid);
