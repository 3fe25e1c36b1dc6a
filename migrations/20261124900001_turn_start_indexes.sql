-- A chat run reads its response's stored tool exchange (`messages` with this `response_id`);
-- the only index on that column was partial (final answers). Without this one every turn
-- scanned `messages`.
CREATE INDEX messages_response_idx ON messages (response_id) WHERE response_id IS NOT NULL;
