-- archsync reference schema, archive side: archival codes roll over to the next volume.
--
-- An archival code is [fonds-]class-volume-item with a 4-digit item number (DA/T 94), so one
-- volume holds at most 9,999 items. 001 numbered every item of a
-- fonds/class/year in volume 1, and the 10,000th item of a year failed the item_no check. Items
-- are now numbered gap-free within a volume, and a full volume starts the next one at item 1.
-- Re-runnable like 001 (IF NOT EXISTS / OR REPLACE); applied once by the migration runner.

-- the current volume of each fonds/class/year; next_item_no is now the next item IN that volume
ALTER TABLE arc_code_sequence
    ADD COLUMN IF NOT EXISTS volume_no integer NOT NULL DEFAULT 1
        CONSTRAINT arc_code_sequence_volume_check CHECK (volume_no BETWEEN 1 AND 9999);

COMMENT ON TABLE arc_code_sequence IS
    'Current volume and next archival item number in it, per fonds/class/year. A row lock (not a '
    'SEQUENCE, which leaves gaps on rollback) keeps item numbers gap-free; use '
    'arc_next_volume_item() inside the filing transaction. fonds_code '''' means "no fonds prefix".';

-- Allocates the next (volume_no, item_no) inside the caller's transaction, as ARRAY[volume, item]
-- (one value, so a caller can draw it once in a select list). When the current volume already
-- holds p_items_per_volume items (1..9999), the item opens the next volume as its item 1. The row
-- stays locked until commit, so a rollback returns the number and concurrent filings queue.
CREATE OR REPLACE FUNCTION arc_next_volume_item(
    p_fonds_code text, p_class_code text, p_fiscal_year integer, p_items_per_volume integer
)
RETURNS integer[]
LANGUAGE sql AS $$
    INSERT INTO arc_code_sequence AS s (fonds_code, class_code, fiscal_year, volume_no, next_item_no)
    VALUES (coalesce(p_fonds_code, ''), p_class_code, p_fiscal_year, 1, 2)
    ON CONFLICT (fonds_code, class_code, fiscal_year)
    DO UPDATE SET
        volume_no = CASE WHEN s.next_item_no > p_items_per_volume THEN s.volume_no + 1 ELSE s.volume_no END,
        next_item_no = CASE WHEN s.next_item_no > p_items_per_volume THEN 2 ELSE s.next_item_no + 1 END,
        updated_at = now()
    RETURNING ARRAY[s.volume_no, s.next_item_no - 1];
$$;

-- 001's function, kept for callers outside archsync: the item number alone, volumes of 9,999
CREATE OR REPLACE FUNCTION arc_next_item_no(p_fonds_code text, p_class_code text, p_fiscal_year integer)
RETURNS integer
LANGUAGE sql AS $$
    SELECT (arc_next_volume_item(p_fonds_code, p_class_code, p_fiscal_year, 9999))[2];
$$;

-- item numbers are unique within a volume (001: within the year)
CREATE UNIQUE INDEX IF NOT EXISTS arc_item_volume_item_key
    ON arc_item (coalesce(fonds_code, ''), class_code, fiscal_year, coalesce(volume_no, 1), item_no)
    WHERE item_no IS NOT NULL;
DROP INDEX IF EXISTS arc_item_number_key;
