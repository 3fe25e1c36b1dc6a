-- Retrieval query side (store::retrieval): keep each chunk's vector inside its heap row.
--
-- A 384-d vector is 1.5 kB; with the chunk's text and its tsvector a row passes the 2 kB TOAST
-- threshold, and with the default EXTENDED storage the vector itself was moved out of line, so
-- every distance computation of a filtered or exact scan fetched it from the TOAST table
-- (3 buffer reads per row at 20k rows in `bench retrieval`). MAIN keeps it inline while the
-- row fits a page: the text and the tsvector are moved out first. Vectors too large for a page
-- (EMBEDDING_DIM in the thousands) still go out of line, as before.
ALTER TABLE embeddings ALTER COLUMN embedding SET STORAGE MAIN;
