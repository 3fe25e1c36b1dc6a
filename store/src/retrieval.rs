//! Retrieval (docs/architecture/retrieval.md): hybrid search over the `embeddings` index, filtered
//! by what the asking user may see *now*.
//!
//! One call of [`search`] runs in its own transaction (a savepoint inside the caller's):
//!
//! 1. The visible set, computed by SQL from the live tables: the project ids of
//!    `conversation_projects_visible(user, conversation)` (visible_projects() narrowed by the
//!    conversation's project list) and the user's teams (`team_members`). Computing it first
//!    and passing it as array parameters gives the planner the real size of the set (a
//!    1 %-visible user is planned as such) and keeps the membership joins out of the
//!    per-candidate filter of the vector scan.
//! 2. Approximate nearest neighbours (HNSW, cosine) under that filter, with pgvector 0.8's
//!    iterative index scan (`hnsw.iterative_scan = relaxed_order`): a restrictive filter no
//!    longer starves the scan (it keeps walking the graph until `candidates` rows pass, or
//!    `hnsw.max_scan_tuples` were visited), so recall holds for users who see 1 % of the index.
//!    The query uses the index's own expression, `embedding::vector(<dim>) <=> $q` with
//!    `dim = <dim>`, and the model.
//! 3. Full-text search (`tsv @@` the text's lexemes ORed, less the corpus's most common ones,
//!    ranked by `ts_rank`) under the same filter.
//! 4. Reciprocal rank fusion (`1 / (60 + rank)` summed over both lists), top `k`.
//!
//! The filter, evaluated per chunk: same org, and either project content whose project is in
//! the visible set and that is unrestricted or lists the user or one of the user's teams, or a
//! conversation message chunk owned by the user (who must still be a member of the org) whose
//! provenance is still within reach: every project it drew on in the visible set (live
//! membership and the conversation's narrowing), every document it drew on visible to the user
//! (`can_see_document`); a chunk that drew on no project stays visible to its owner;
//! documents additionally must not be deleted (belt and braces: deleting a document also
//! removes its rows). Nothing is cached: a revoked membership, a narrowed conversation or a
//! deleted document takes effect on the next call, before any re-index.

use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::StoreError;
use crate::types::{ConversationId, MessageId, OrgId, ProjectId, TeamId, UserId};

/// The `k` of reciprocal rank fusion (Cormack et al.): a result at rank r of a list scores
/// `1 / (RRF_K + r)`.
pub const RRF_K: f64 = 60.0;

/// One retrieval request.
#[derive(Debug, Clone)]
pub struct Query<'a> {
    pub org_id: OrgId,
    pub user_id: UserId,
    /// The conversation asked in: its project narrowing applies, and it must be the user's.
    pub conversation_id: ConversationId,
    /// The query's embedding (`model`, `dim`); `None` when the embedder failed: full-text only.
    pub embedding: Option<&'a pgvector::Vector>,
    /// The user's words, for full-text search.
    pub text: &'a str,
    /// The embedding model whose rows are searched (rows of other models are ignored).
    pub model: &'a str,
    /// The embedding dimension (selects the HNSW index `embeddings_hnsw_d<dim>`).
    pub dim: u32,
    /// How many fused results to return.
    pub k: u32,
    /// Message chunks to leave out (the conversation's recent window, already in the prompt).
    pub exclude_message_ids: &'a [MessageId],
}

/// Knobs of the search (config `[retrieval]`).
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Rows taken from each list (vector, full text) before fusion.
    pub candidates: u32,
    /// `hnsw.ef_search`: the HNSW candidate list (at least `candidates`).
    pub ef_search: u32,
    /// `hnsw.max_scan_tuples`: how far an iterative scan may walk for a restrictive filter.
    pub max_scan_tuples: u32,
    /// A user who sees at most this many chunks gets an exact vector search (the visible rows
    /// through the `project_id` index, every distance computed, top-n sorted) instead of the
    /// HNSW scan: cheaper and exact for a small visible set, where a graph walk would reject
    /// ~99 % of what it visits. 0 turns it off.
    pub exact_max_rows: u32,
    /// A lexeme of the question is left out of the full-text query when it is in more than
    /// [`COMMON_TERM_FREQ`] of all chunks AND in more than this many (estimated from
    /// PostgreSQL's statistics): a long posting list, and little said about relevance. The
    /// absolute floor keeps every term of a small corpus, where one chunk is already 2 %.
    /// 0 turns it off.
    pub stopword_min_rows: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            candidates: 40,
            ef_search: 100,
            max_scan_tuples: 20_000,
            exact_max_rows: 20_000,
            stopword_min_rows: 10_000,
        }
    }
}

/// One retrieved chunk with its source (for the prompt label and the citation).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Chunk {
    pub id: Uuid,
    /// `document`, `project`, `task` or `message`.
    pub source_kind: String,
    pub source_id: Uuid,
    pub chunk_index: i32,
    pub project_id: Option<ProjectId>,
    pub title: String,
    pub content: String,
    /// Fused score, `Σ 1 / (60 + rank)`.
    pub score: f64,
    /// 1-based rank in the vector list, if it was there.
    pub vector_rank: Option<i64>,
    /// 1-based rank in the full-text list, if it was there.
    pub text_rank: Option<i64>,
    /// Project content restricted to listed users/teams (narrower than its project).
    pub restricted: bool,
    /// What a message chunk drew on (empty for project content, whose source is itself).
    #[sqlx(flatten)]
    pub provenance: crate::provenance::Provenance,
}

/// The visible set, from the live tables.
struct Visible {
    projects: Vec<ProjectId>,
    /// The user sees every project of the org (an owner or admin, or a small org): the project
    /// test is then `project_id IS NOT NULL` instead of a long `= ANY(array)`, whose
    /// planning alone cost ~6 ms with 1 000 projects.
    all: bool,
    teams: Vec<TeamId>,
    /// Still a member of the org (message chunks need it; projects imply it).
    member: bool,
}

async fn visible(conn: &mut PgConnection, q: &Query<'_>) -> Result<Visible, StoreError> {
    let (projects, teams, member, org_projects): (Vec<ProjectId>, Vec<TeamId>, bool, i64) =
        sqlx::query_as(
            "SELECT
             coalesce((SELECT array_agg(v.project_id)
                       FROM conversation_projects_visible($1, $2) v
                       JOIN projects p ON p.id = v.project_id AND p.org_id = $3), '{}'),
             coalesce((SELECT array_agg(tm.team_id)
                       FROM team_members tm WHERE tm.user_id = $1 AND tm.org_id = $3), '{}'),
             EXISTS (SELECT 1 FROM org_memberships m WHERE m.user_id = $1 AND m.org_id = $3)
               AND EXISTS (SELECT 1 FROM conversations c
                           WHERE c.id = $2 AND c.user_id = $1 AND c.org_id = $3),
             (SELECT count(*) FROM projects p WHERE p.org_id = $3)",
        )
        .bind(q.user_id)
        .bind(q.conversation_id)
        .bind(q.org_id)
        .fetch_one(&mut *conn)
        .await?;
    let all = !projects.is_empty() && i64::try_from(projects.len()).ok() == Some(org_projects);
    Ok(Visible {
        projects,
        all,
        teams,
        member,
    })
}

/// The per-chunk visibility filter on `e`. Parameters: $1 org, $2 user, $3 visible project
/// ids, $4 the user's team ids, $5 excluded message ids, $6 model.
///
/// Written for the planner's estimates: "unrestricted" is `= '{}'` (estimated from the column's
/// most common values, ~all rows) rather than `cardinality(..) = 0` (a function: a fixed 0.5 %
/// guess, which made every user look like a 0.003 %-visible one and kept the HNSW index out of
/// the plan even for users who see everything).
fn filter(all_projects: bool) -> String {
    let project = if all_projects {
        "e.project_id IS NOT NULL"
    } else {
        "e.project_id = ANY($3)"
    };
    let provenance = crate::provenance::chunk_visible_sql("e", "$2", "$3", "$4");
    format!(
        "
    e.org_id = $1 AND e.model = $6
    AND (
        ({project}
         AND ((e.allowed_user_ids = '{{}}' AND e.allowed_team_ids = '{{}}')
              OR $2 = ANY(e.allowed_user_ids)
              OR e.allowed_team_ids && $4))
     OR (e.owner_user_id = $2 AND e.source_kind = 'message' AND NOT (e.source_id = ANY($5))
         AND {provenance})
    )
    AND (e.source_kind <> 'document' OR NOT EXISTS (
        SELECT 1 FROM documents d WHERE d.id = e.source_id AND d.deleted_at IS NOT NULL))"
    )
}

/// How the vector list is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// The HNSW index (iterative scan under the filter).
    Index,
    /// Every visible row's distance, top-n sorted: ordered by `distance + 0`, an expression no
    /// index provides, so the planner reads the visible rows through the filter's own indexes
    /// (`project_id`, `owner_user_id`) instead of walking the graph.
    Exact,
}

/// The vector list: the `candidates` nearest visible chunks. Parameters as [`filter`], plus $7
/// the query vector and $8 the limit. `dim` is a validated integer from configuration.
fn ann_sql(dim: u32, all_projects: bool, scan: Scan) -> String {
    let filter = filter(all_projects);
    let distance = format!("e.embedding::vector({dim}) <=> $7::vector({dim})");
    let order = match scan {
        Scan::Index => distance.clone(),
        Scan::Exact => format!("({distance}) + 0"),
    };
    format!(
        "SELECT e.id, {distance} AS distance
         FROM embeddings e
         WHERE e.dim = {dim} AND {filter}
         ORDER BY {order}
         LIMIT $8"
    )
}

/// Whether the user's visible chunks number at most `max` (counted up to `max + 1` on the
/// `project_id` and `owner_user_id` indexes; rows of other models count too, an overestimate
/// that only ever chooses the index scan). A user who sees every project never qualifies.
async fn choose_scan(
    conn: &mut PgConnection,
    q: &Query<'_>,
    vis: &Visible,
    max: u32,
) -> Result<Scan, StoreError> {
    if max == 0 || vis.all {
        return Ok(Scan::Index);
    }
    let n: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM embeddings e
                                        WHERE e.project_id = ANY($1) LIMIT $3) p)
              + (SELECT count(*) FROM (SELECT 1 FROM embeddings e
                                        WHERE e.owner_user_id = $2 LIMIT $3) m)",
    )
    .bind(&vis.projects)
    .bind(q.user_id)
    .bind(i64::from(max) + 1)
    .fetch_one(&mut *conn)
    .await?;
    Ok(if n <= i64::from(max) {
        Scan::Exact
    } else {
        Scan::Index
    })
}

/// At most this many full-text matches are ranked (`ts_rank` reads each one's `tsv`). Rare
/// terms — names, codes, the words that make full text worth having beside vectors — match
/// fewer rows and are ranked completely; a term in most chunks only costs this much.
const FTS_RANKED: u32 = 500;

/// The full-text list. Parameters as [`filter`], plus $9 the text and $8 the limit.
///
/// A chat message is a question, not a search expression: a chunk rarely holds every word of a
/// question, so its terms are ORed (see [`tsquery`]) and `ts_rank` prefers chunks holding more
/// of them. A phrase the user put in quotes ranks the chunks holding it, words in order, above
/// those that only hold its words (`q.pq`; it adds 1 to the rank, which `ts_rank` keeps under
/// 1). It does not widen the match: its words are among the ORed terms already. Without a
/// phrase the `@@` is not evaluated at all: each evaluation reads the match's toasted `tsv`
/// again, which at 1M chunks added 2–6 ms to every search.
fn fts_sql(all_projects: bool, stopword_min_rows: u32) -> String {
    let filter = filter(all_projects);
    let tsquery = tsquery(stopword_min_rows);
    format!(
        "SELECT m.id,
                ts_rank(m.tsv, m.tq)
                    + CASE WHEN numnode(m.pq) = 0 THEN 0 WHEN m.tsv @@ m.pq THEN 1 ELSE 0 END
                    AS rank
         FROM (SELECT e.id, e.tsv, q.tq, q.pq
               FROM embeddings e, {tsquery}
               WHERE e.tsv @@ q.tq AND {filter}
               LIMIT {FTS_RANKED}) m
         ORDER BY rank DESC, m.id
         LIMIT $8"
    )
}

/// Lexemes in more than this fraction of all chunks (PostgreSQL's own statistics of `tsv`,
/// `pg_stats.most_common_elems`) and in more than [`Tuning::stopword_min_rows`] chunks are left
/// out of the full-text query: corpus stopwords. They say little about relevance (a term in
/// 20 % of the chunks), and a GIN scan must walk a posting list that long before the visibility
/// filter keeps the user's share of it — at 1M chunks ~90 ms for one such term.
const COMMON_TERM_FREQ: f64 = 0.02;

/// The full-text query of the user's words ($9), as `q.tq` (see [`fts_sql`]): their lexemes
/// (`to_tsvector('english', ..)`) ORed, without the corpus stopwords ([`COMMON_TERM_FREQ`];
/// before the first `ANALYZE` nothing is left out; `min_rows` 0: nothing ever is). All
/// common: an empty query, which matches nothing. And `q.pq`: the phrases in straight or curly
/// double quotes (up to 200 characters each, of two words or more), each as
/// `phraseto_tsquery`, ORed; empty when there are none.
fn tsquery(min_rows: u32) -> String {
    let common = if min_rows == 0 {
        String::new()
    } else {
        format!(
            "WHERE l.lexeme NOT IN (
                 SELECT c.elem
                 FROM pg_stats s
                 JOIN pg_class t ON t.relname = s.tablename
                     AND t.relnamespace = to_regnamespace(s.schemaname),
                      unnest(s.most_common_elems::text::text[], s.most_common_elem_freqs)
                          AS c(elem, freq)
                 WHERE s.schemaname = current_schema() AND s.tablename = 'embeddings'
                   AND s.attname = 'tsv' AND c.elem IS NOT NULL
                   AND c.freq > {COMMON_TERM_FREQ} AND c.freq * t.reltuples > {min_rows})"
        )
    };
    format!(
        "(SELECT (SELECT coalesce(string_agg(quote_literal(l.lexeme), ' | '), '')::tsquery
                  FROM unnest(tsvector_to_array(to_tsvector('english', $9))) AS l(lexeme)
                  {common}) AS tq,
                 (SELECT coalesce(string_agg('(' || p.q::text || ')', ' | '), '')::tsquery
                  FROM regexp_matches($9, '[\"“”]([^\"“”]{{1,200}})[\"“”]', 'g') AS m(g),
                       LATERAL phraseto_tsquery('english', m.g[1]) AS p(q)
                  WHERE numnode(p.q) > 1) AS pq) q"
    )
}

fn search_sql(
    dim: u32,
    with_vector: bool,
    all_projects: bool,
    scan: Scan,
    stopword_min_rows: u32,
) -> String {
    let ann = if with_vector {
        format!(
            "ann AS MATERIALIZED ({}),
             ann_ranked AS (SELECT id, row_number() OVER (ORDER BY distance, id) AS r FROM ann),",
            ann_sql(dim, all_projects, scan)
        )
    } else {
        "ann_ranked AS (SELECT NULL::uuid AS id, NULL::bigint AS r WHERE false),".to_owned()
    };
    let lists = format!(
        "{ann}
         fts AS MATERIALIZED ({}),
         fts_ranked AS (SELECT id, row_number() OVER (ORDER BY rank DESC, id) AS r FROM fts),",
        fts_sql(all_projects, stopword_min_rows)
    );
    format!(
        "WITH {lists}
         fused AS (
             SELECT coalesce(a.id, f.id) AS id,
                    coalesce(1.0 / ({rrf} + a.r), 0) + coalesce(1.0 / ({rrf} + f.r), 0) AS score,
                    a.r AS vector_rank, f.r AS text_rank
             FROM ann_ranked a FULL JOIN fts_ranked f ON f.id = a.id),
         top AS (
             SELECT * FROM fused ORDER BY score DESC, vector_rank NULLS LAST, id LIMIT $10)
         SELECT e.id, e.source_kind, e.source_id, e.chunk_index, e.project_id, e.title,
                e.content, top.score::float8 AS score, top.vector_rank, top.text_rank,
                (e.allowed_user_ids <> '{{}}' OR e.allowed_team_ids <> '{{}}') AS restricted,
                e.source_project_ids, e.source_document_ids, e.narrow
         FROM top JOIN embeddings e ON e.id = top.id
         ORDER BY top.score DESC, top.vector_rank NULLS LAST, e.id",
        rrf = RRF_K,
    )
}

/// Per-transaction settings (`SET LOCAL`, through `set_config`): no notices (a question of
/// stopwords only is no news), the HNSW scan's, and custom
/// plans always — a prepared statement's generic plan (after 5 runs) cannot see how many
/// projects the array parameter holds, and chose a sequential scan for every user.
async fn tune(conn: &mut PgConnection, t: &Tuning) -> Result<(), StoreError> {
    sqlx::query(
        "SELECT set_config('plan_cache_mode', 'force_custom_plan', true),
                set_config('client_min_messages', 'warning', true),
                set_config('hnsw.iterative_scan', 'relaxed_order', true),
                set_config('hnsw.ef_search', $1, true),
                set_config('hnsw.max_scan_tuples', $2, true)",
    )
    .bind(t.ef_search.max(t.candidates).clamp(1, 1000).to_string())
    .bind(t.max_scan_tuples.max(1).to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn to_i64(n: u32) -> i64 {
    i64::from(n)
}

/// Hybrid search: the top `k` chunks the user may see, vector and full-text results fused by
/// reciprocal rank. An embedding of the wrong dimension counts as none (full text only).
pub async fn search(
    conn: &mut PgConnection,
    q: &Query<'_>,
    tuning: &Tuning,
) -> Result<Vec<Chunk>, StoreError> {
    if q.k == 0 {
        return Ok(Vec::new());
    }
    let embedding = q
        .embedding
        .filter(|v| u32::try_from(v.as_slice().len()).ok() == Some(q.dim));
    let mut tx = conn.begin().await?;
    let vis = visible(&mut tx, q).await?;
    // Not a member (any more): nothing at all, message chunks included.
    if !vis.member {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    tune(&mut tx, tuning).await?;
    let scan = match embedding {
        Some(_) => choose_scan(&mut tx, q, &vis, tuning.exact_max_rows).await?,
        None => Scan::Index,
    };
    let sql = search_sql(
        q.dim,
        embedding.is_some(),
        vis.all,
        scan,
        tuning.stopword_min_rows,
    );
    let rows = search_list::<Chunk>(&mut tx, sql, q, &vis, embedding, tuning).await?;
    tx.commit().await?;
    Ok(rows)
}

/// Runs a statement over [`search_sql`]'s parameters.
async fn search_list<T>(
    conn: &mut PgConnection,
    sql: String,
    q: &Query<'_>,
    vis: &Visible,
    embedding: Option<&pgvector::Vector>,
    tuning: &Tuning,
) -> Result<Vec<T>, StoreError>
where
    T: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    Ok(sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(sql))
        .bind(q.org_id)
        .bind(q.user_id)
        .bind(&vis.projects)
        .bind(&vis.teams)
        .bind(q.exclude_message_ids)
        .bind(q.model)
        .bind(embedding)
        .bind(to_i64(tuning.candidates.max(q.k)))
        .bind(q.text)
        .bind(to_i64(q.k))
        .fetch_all(&mut *conn)
        .await?)
}

/// How [`nearest`] finds the vector list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nearest {
    /// As [`search`] does: exact for a small visible set, else the HNSW scan.
    Auto,
    /// Brute force over the filtered set with index scans off: the reference answer for
    /// recall, whatever the visible set's size.
    Reference,
}

/// The vector list alone (ids, nearest first), with the same filter as [`search`]: what the
/// benchmark measures. Also returns whether the exact scan was chosen.
pub async fn nearest(
    conn: &mut PgConnection,
    q: &Query<'_>,
    tuning: &Tuning,
    limit: u32,
    how: Nearest,
) -> Result<(Vec<Uuid>, bool), StoreError> {
    let Some(embedding) = q.embedding else {
        return Ok((Vec::new(), false));
    };
    let mut tx = conn.begin().await?;
    let vis = visible(&mut tx, q).await?;
    if !vis.member {
        tx.commit().await?;
        return Ok((Vec::new(), false));
    }
    tune(&mut tx, tuning).await?;
    let scan = match how {
        Nearest::Auto => choose_scan(&mut tx, q, &vis, tuning.exact_max_rows).await?,
        Nearest::Reference => {
            sqlx::query("SET LOCAL enable_indexscan = off")
                .execute(&mut *tx)
                .await?;
            Scan::Index
        }
    };
    let sql = format!(
        "SELECT id FROM ({}) ann ORDER BY distance, id",
        ann_sql(q.dim, vis.all, scan)
    );
    let ids = vector_list(&mut tx, sql, q, &vis, embedding, limit).await?;
    tx.commit().await?;
    Ok((ids, scan == Scan::Exact))
}

/// Runs a statement over [`ann_sql`]'s parameters.
async fn vector_list<T>(
    conn: &mut PgConnection,
    sql: String,
    q: &Query<'_>,
    vis: &Visible,
    embedding: &pgvector::Vector,
    limit: u32,
) -> Result<Vec<T>, StoreError>
where
    T: Send + Unpin,
    (T,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    Ok(sqlx::query_scalar::<_, T>(sqlx::AssertSqlSafe(sql))
        .bind(q.org_id)
        .bind(q.user_id)
        .bind(&vis.projects)
        .bind(&vis.teams)
        .bind(q.exclude_message_ids)
        .bind(q.model)
        .bind(embedding)
        .bind(to_i64(limit))
        .fetch_all(&mut *conn)
        .await?)
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of the vector list as [`search`] runs it, for the benchmark
/// and operators.
pub async fn explain_nearest(
    conn: &mut PgConnection,
    q: &Query<'_>,
    tuning: &Tuning,
    limit: u32,
) -> Result<Vec<String>, StoreError> {
    let Some(embedding) = q.embedding else {
        return Ok(Vec::new());
    };
    let mut tx = conn.begin().await?;
    let vis = visible(&mut tx, q).await?;
    tune(&mut tx, tuning).await?;
    let scan = choose_scan(&mut tx, q, &vis, tuning.exact_max_rows).await?;
    let sql = format!(
        "EXPLAIN (ANALYZE, BUFFERS) {}",
        ann_sql(q.dim, vis.all, scan)
    );
    let lines = vector_list(&mut tx, sql, q, &vis, embedding, limit).await?;
    tx.commit().await?;
    Ok(lines)
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of the whole hybrid query of [`search`].
pub async fn explain_search(
    conn: &mut PgConnection,
    q: &Query<'_>,
    tuning: &Tuning,
) -> Result<Vec<String>, StoreError> {
    let mut tx = conn.begin().await?;
    let vis = visible(&mut tx, q).await?;
    tune(&mut tx, tuning).await?;
    let scan = match q.embedding {
        Some(_) => choose_scan(&mut tx, q, &vis, tuning.exact_max_rows).await?,
        None => Scan::Index,
    };
    let sql = format!(
        "EXPLAIN (ANALYZE, BUFFERS) {}",
        search_sql(
            q.dim,
            q.embedding.is_some(),
            vis.all,
            scan,
            tuning.stopword_min_rows
        )
    );
    let lines = search_list::<(String,)>(&mut tx, sql, q, &vis, q.embedding, tuning).await?;
    tx.commit().await?;
    Ok(lines.into_iter().map(|(line,)| line).collect())
}
