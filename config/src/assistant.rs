//! What the model-facing work uses: the chat turn, its tools, retrieval, memory, embeddings and
//! document indexing.

use serde::Deserialize;

/// Bound on `INDEX_CHUNK_TOKENS` (32 KiB of text per chunk).
pub const MAX_CHUNK_TOKENS: usize = 8192;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexSettings {
    pub interval_secs: u64,
    /// Token budget of one chunk; tokens are approximated as characters / 4.
    pub chunk_tokens: usize,
    /// Tokens (characters / 4) repeated from the end of a chunk at the start of the next one.
    pub chunk_overlap_tokens: usize,
    /// Outbox sources one index batch (one transaction) processes.
    pub batch_sources: usize,
    /// Inputs per embedding request.
    pub embed_batch: usize,
    /// Attempts at indexing one source before its outbox rows are dead-lettered.
    pub source_max_attempts: u32,
    /// Seconds a source that failed waits before its next attempt (doubling per attempt).
    pub source_retry_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatSettings {
    pub recent_messages: usize,
    pub model_timeout_secs: u64,
    pub default_model: String,
    pub default_fallback_model: String,
    pub temperature: f64,
    pub max_tokens: u32,
    /// How long a chat turn may wait on rate limits (429s and model cooldowns), counted from
    /// the response's creation, before the user gets a `rate_limited` error.
    pub rate_limit_max_wait_secs: u64,
}

/// The assistant's tools and supervised writes (docs/ARCHITECTURE.md, "Scope and tools").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolsSettings {
    /// Tool-call rounds one turn may run; then the model must answer without tools.
    pub max_rounds: u32,
    /// A pending proposal expires this long after it was made.
    pub action_expiry_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSettings {
    pub model: String,
    pub dim: u32,
}

/// Retrieval in the chat turn (store::retrieval; docs/ARCHITECTURE.md, "Retrieval").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalSettings {
    /// Chunks retrieved per turn (after fusion), at most.
    pub top_k: u32,
    /// Rows taken from each list (vector, full text) before reciprocal rank fusion.
    pub candidates: u32,
    /// Estimated tokens (4 characters each) of the prompt's workspace-data section, at most.
    pub token_budget: u32,
    /// `hnsw.ef_search` of the vector scan.
    pub ef_search: u32,
    /// `hnsw.max_scan_tuples`: how far an iterative scan walks for a restrictive filter.
    pub max_scan_tuples: u32,
    /// A user who sees at most this many chunks is searched exactly (no HNSW); 0: never.
    pub exact_max_rows: u32,
    /// A question's term found in more than 2 % of all chunks and in more than this many is
    /// left out of the full-text query (a corpus stopword); 0: never.
    pub stopword_min_rows: u32,
    /// The query's embedding call gives up after this; the turn then uses full text only.
    pub embed_timeout_ms: u64,
}

/// Conversation memory (`[memory]`): summary + recent, and the hierarchical memory entries
/// (docs/ARCHITECTURE.md, "Memory").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySettings {
    /// Messages older than the `RECENT_MESSAGES` window and not yet summarized; at this many a
    /// finished turn enqueues a `summarize` job (`SUMMARIZE_THRESHOLD`).
    pub summarize_threshold: usize,
    /// Messages one summarize run folds at most (the rest waits for the next run).
    pub summarize_batch: usize,
    /// The running summary is cut to this many characters.
    pub summary_max_chars: usize,
    /// Tokens (estimated as characters / 4) the memory entries may take in a prompt
    /// (`MEMORY_TOKEN_BUDGET`).
    pub token_budget: usize,
    /// Entries kept per owner and tier; the oldest go beyond (`MEMORY_CAPACITY_ORG`, ...).
    pub capacity_org: u32,
    pub capacity_project: u32,
    pub capacity_user: u32,
    /// Project entries one author may hold in one project; their oldest go beyond, so one
    /// member cannot fill a project's capacity and evict the others' facts
    /// (`MEMORY_CAPACITY_PROJECT_PER_AUTHOR`).
    pub capacity_project_per_author: u32,
    /// A new fact closer than this cosine distance to an entry of the same owner refreshes
    /// that entry instead of adding one.
    pub dedup_distance: f64,
    /// Whether finished turns enqueue a `remember` job (fact extraction).
    pub remember: bool,
}

impl MemorySettings {
    /// The capacity of a tier (`org`, `project`, `user`).
    pub fn capacity(&self, tier: &str) -> u32 {
        match tier {
            "org" => self.capacity_org,
            "project" => self.capacity_project,
            _ => self.capacity_user,
        }
    }
}
