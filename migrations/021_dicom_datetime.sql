-- QIDO-RS range matching of DateTime (DT) values with UTC offsets (PS3.18 8.3.4.1,
-- PS3.4 C.2.2.2.5): a DT value (PS3.5 Table 6.2-1, YYYY[MM[DD[HH[MM[SS[.F{1-6}]]]]]][&ZZXX])
-- as a comparable text in UTC, YYYYMMDDHHMMSS.FFFFFF, missing components at their least.
-- default_offset (+HHMM / -HHMM; the instance's TimezoneOffsetFromUTC, PS3.3 C.12.1.1.8) applies
-- to a value without its own offset; with neither, the value is taken as UTC. NULL for a value
-- that is not a DT; a default_offset that is not an offset is ignored.
CREATE FUNCTION dicom_dt_utc(value text, default_offset text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
  m text[];
  digits text;
  offset_text text;
  at timestamp;
BEGIN
  m := regexp_match(value, '^([0-9]{4}(?:[0-9]{2}){0,5})(\.[0-9]{1,6})?([+-][0-9]{4})?$');
  IF m IS NULL THEN
    RETURN NULL;
  END IF;
  digits := m[1] || substr('0101000000', length(m[1]) - 3);
  IF default_offset !~ '^[+-][0-9]{4}$' THEN
    default_offset := NULL;
  END IF;
  offset_text := coalesce(m[3], default_offset);
  BEGIN
    at := make_timestamp(
      substr(digits, 1, 4)::int, substr(digits, 5, 2)::int, substr(digits, 7, 2)::int,
      substr(digits, 9, 2)::int, substr(digits, 11, 2)::int, substr(digits, 13, 2)::int
    );
  EXCEPTION WHEN others THEN
    RETURN NULL;  -- month 13, 31 February, hour 25: not a date-time
  END;
  IF offset_text IS NOT NULL THEN
    at := at - (substr(offset_text, 1, 1) || (
      substr(offset_text, 2, 2)::int * 60 + substr(offset_text, 4, 2)::int
    )::text || ' minutes')::interval;
  END IF;
  RETURN to_char(at, 'YYYYMMDDHH24MISS') || rpad(coalesce(m[2], '.'), 7, '0');
END;
$$;
