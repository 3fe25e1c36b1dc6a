-- pgvector for the embeddings index (SPEC §4). On managed PostgreSQL the extension may have to be
-- allow-listed first; see docs/OPERATIONS.md.
CREATE EXTENSION IF NOT EXISTS vector;
