-- Indexes that produce QIDO-RS result order directly, so a page is read in order and
-- `offset` skips index entries instead of sorting and evaluating every matching row.
DROP INDEX studies_date;
CREATE INDEX studies_order ON studies (study_date, study_time, study_uid);
DROP INDEX series_study;
CREATE INDEX series_order ON series (study_uid, series_number, series_uid);
DROP INDEX instances_series;
CREATE INDEX instances_order ON instances (series_uid, instance_number, sop_uid);
