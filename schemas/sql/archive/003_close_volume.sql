-- archsync reference schema, archive side: a clerk closes a volume by hand.
--
-- A volume (案卷) of a fonds/class/year is filled item by item (002). Clerks also close one
-- before it is full: at the end of a month or a batch of vouchers, or when the next items belong
-- in a new volume. After arc_close_volume() the next item allocated opens the next volume as its
-- item 1. Volume numbers stay gap-free: a volume with no item yet is not closed (there is nothing
-- to close), so closing twice in a row does not skip a volume number.
-- Re-runnable like 001/002 (IF NOT EXISTS / OR REPLACE); applied once by the migration runner.

-- who closed which volume, when, with how many items (append-only: a business-activity record)
CREATE TABLE IF NOT EXISTS arc_volume_closure (
    fonds_code      text NOT NULL,
    class_code      text NOT NULL,
    fiscal_year     integer NOT NULL,
    volume_no       integer NOT NULL CONSTRAINT arc_volume_closure_volume_check CHECK (volume_no BETWEEN 1 AND 9999),
    item_count      integer NOT NULL CONSTRAINT arc_volume_closure_items_check CHECK (item_count BETWEEN 1 AND 9999),
    closed_by       text NOT NULL,
    closed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (fonds_code, class_code, fiscal_year, volume_no)
);
COMMENT ON TABLE arc_volume_closure IS
    'Volumes closed by hand before they were full (arc_close_volume). A volume closed because it was '
    'full is not listed. fonds_code '''' means "no fonds prefix".';

-- Closes the current volume of a fonds/class/year: returns its number, or NULL when there is no
-- volume with an item to close (no sequence yet, or the current volume is still empty). Takes the
-- sequence's row lock like arc_next_volume_item(), so a filing in flight finishes first (its item
-- stays in the closed volume) and filings after it go to the next volume.
CREATE OR REPLACE FUNCTION arc_close_volume(
    p_fonds_code text, p_class_code text, p_fiscal_year integer, p_closed_by text
)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    closed integer;
    items integer;
BEGIN
    IF coalesce(btrim(p_closed_by), '') = '' THEN
        RAISE EXCEPTION 'arc_close_volume: who closes the volume must be given (p_closed_by)';
    END IF;
    SELECT s.volume_no, s.next_item_no - 1 INTO closed, items
      FROM arc_code_sequence s
     WHERE s.fonds_code = coalesce(p_fonds_code, '') AND s.class_code = p_class_code
       AND s.fiscal_year = p_fiscal_year
       FOR UPDATE;
    IF closed IS NULL OR items < 1 THEN
        RETURN NULL;  -- no volume yet, or the current one has no item: nothing to close
    END IF;
    IF closed >= 9999 THEN
        RAISE EXCEPTION 'arc_close_volume: volume % is the last one an archival code can number', closed;
    END IF;
    UPDATE arc_code_sequence
       SET volume_no = closed + 1, next_item_no = 1, updated_at = now()
     WHERE fonds_code = coalesce(p_fonds_code, '') AND class_code = p_class_code AND fiscal_year = p_fiscal_year;
    INSERT INTO arc_volume_closure (fonds_code, class_code, fiscal_year, volume_no, item_count, closed_by)
    VALUES (coalesce(p_fonds_code, ''), p_class_code, p_fiscal_year, closed, items, btrim(p_closed_by));
    RETURN closed;
END;
$$;
