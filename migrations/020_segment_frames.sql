-- The frames each SEG segment occupies (issue #8): the frame numbers (1-based, ascending) in
-- which the segment has a pixel, and aligned with them the SOP Instance UID of the image each
-- frame was derived from (PS3.3 C.7.6.16.2.6 Derivation Image functional group; NULL where a
-- frame names none), so a viewer can go from a segment to the slices it lies on.
-- frame_count stays (the length of frames). Rows indexed before this migration keep NULL
-- here until `carina reindex-derived` rebuilds them from the stored objects.
ALTER TABLE segments
    ADD COLUMN frames integer[],
    ADD COLUMN frame_sop_uids text[];
-- "Which segments lie on this image": frame_sop_uids @> ARRAY[uid].
CREATE INDEX segments_frame_sop_uids ON segments USING gin (frame_sop_uids);
