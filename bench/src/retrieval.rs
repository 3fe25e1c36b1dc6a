//! `bench retrieval`: the query side of retrieval (`store::retrieval`) on a generated index, in
//! a scratch database.
//!
//! 1. **load** — one org, `--projects` private projects, `--chunks` chunks spread over them at
//!    random (2 % restricted to a user nobody is), bulk-loaded with `COPY ... FROM STDIN`;
//!    vectors are clustered unit vectors (`--clusters` random centres plus Gaussian noise of
//!    the same norm), texts are 24 words drawn (Zipf-like) from a 5 000-word vocabulary. Then
//!    `ANALYZE` and the production HNSW index (`store::embeddings::ensure_vector_index`),
//!    built after loading.
//! 2. **query** — three users: members of 1 % and 10 % of the projects, and an org admin
//!    (every project). For each, `--queries` queries (a random centre plus noise, 3 words):
//!    - `ann`: the filtered vector list alone (`store::retrieval::nearest`, top 10), latency,
//!      and recall@10 against the exact answer — the same query and filter with index scans
//!      off (`SET LOCAL enable_indexscan = off`: brute force over the filtered set);
//!    - `hybrid`: the whole `store::retrieval::search` a chat turn runs (vector + full text,
//!      rank fusion, top 10), latency.
//! 3. `--explain`: `EXPLAIN (ANALYZE, BUFFERS)` of the 1 % user's vector query.
//!
//! Indexing throughput (chunking + embedding + upsert through the real `index` pass, with the
//! zero-latency fake embedder) is measured first by the indexer's `bench index`
//! (`--index-chunks`, 0 to skip), in its own scratch database; this command's own load is a bulk
//! COPY (its rate and the HNSW build time are printed too).
//!
//! The last line is `retrieval: chunks=N p95_ms=X recall_at_10=R (1% visible)`, with X the
//! p95 of the 1 %-visible user's hybrid search (what a turn pays) and R its ANN recall@10.

use std::time::Instant;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};
use store::retrieval::{self, Nearest, Query, Tuning};
use uuid::Uuid;

use crate::scratch::ScratchDb;
use crate::stats::Samples;

const MODEL: &str = "bench-embed";
const VOCABULARY: usize = 5_000;

#[derive(clap::Args, Debug, Clone)]
pub struct RetrievalArgs {
    /// Chunks in the index.
    #[arg(long, default_value_t = 100_000)]
    chunks: usize,
    /// Projects they are spread over (the 1 % user is a member of projects/100 of them).
    #[arg(long, default_value_t = 1_000)]
    projects: usize,
    /// Chunks per source (document): a source's chunks are written together, as the indexer
    /// writes each source's chunks in one batch, so they share heap pages; 1 scatters every
    /// chunk (the worst case for reading one user's visible rows).
    #[arg(long, default_value_t = 8)]
    chunks_per_source: usize,
    /// Vector clusters (topics).
    #[arg(long, default_value_t = 100)]
    clusters: usize,
    /// Measured queries per user (after 20 warm-up queries).
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Embedding dimension.
    #[arg(long, default_value_t = 384)]
    dim: u32,
    /// `hnsw.ef_search` (RETRIEVAL_EF_SEARCH).
    #[arg(long, default_value_t = 100)]
    ef_search: u32,
    /// `hnsw.max_scan_tuples` (RETRIEVAL_MAX_SCAN_TUPLES).
    #[arg(long, default_value_t = 20_000)]
    max_scan_tuples: u32,
    /// Print EXPLAIN (ANALYZE, BUFFERS) of the 1 %-visible user's vector query.
    #[arg(long)]
    explain: bool,
    /// Keep the scratch database (to inspect plans with psql); drop it yourself afterwards.
    #[arg(long)]
    keep: bool,
    /// Seed of the generated data and queries.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Sources for the indexing-throughput pass run first (`bench index`); 0 skips it.
    #[arg(long, default_value_t = 2_000)]
    index_chunks: usize,
    /// RETRIEVAL_EXACT_MAX_ROWS: a user seeing at most this many chunks is searched exactly.
    #[arg(long, default_value_t = 20_000)]
    exact_max_rows: u32,
    /// RETRIEVAL_STOPWORD_MIN_ROWS: a term in more than 2 % of the chunks and in more than
    /// this many is left out of the full-text query (0: never).
    #[arg(long, default_value_t = 10_000)]
    stopword_min_rows: u32,
    /// Query a database kept by an earlier `--keep` run (same `--seed`, `--clusters`, `--dim`)
    /// instead of loading a new one: no load, no index build. Kept afterwards.
    #[arg(long, value_name = "DATABASE")]
    reuse: Option<String>,
}

pub async fn bench_retrieval(
    settings: config::Settings,
    args: RetrievalArgs,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.projects >= 100, "--projects must be at least 100");
    anyhow::ensure!(
        args.chunks > 0 && args.clusters > 0 && args.queries > 0,
        "counts must be positive"
    );
    if let Some(name) = &args.reuse {
        let db = ScratchDb::existing(&settings.database.url, name)?;
        #[allow(clippy::print_stdout)]
        {
            println!("retrieval: reusing the kept database {}", db.name);
        }
        return run(&db, &args).await;
    }
    if args.index_chunks > 0 {
        crate::index::bench_index(settings.clone(), args.index_chunks).await?;
    }
    let db = ScratchDb::create(&settings.database.url).await?;
    #[allow(clippy::print_stdout)]
    {
        println!("retrieval: scratch database {}", db.name);
    }
    let outcome = run(&db, &args).await;
    if args.keep {
        #[allow(clippy::print_stdout)]
        {
            println!("retrieval: kept the scratch database {}", db.name);
        }
    } else {
        db.drop_db().await;
    }
    outcome
}

/// A standard normal sample (Box–Muller).
fn gauss(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-9);
    v.iter_mut().for_each(|x| *x /= n);
}

/// Clustered unit vectors: a centre plus noise of about the same norm.
struct Vectors {
    centres: Vec<Vec<f32>>,
    dim: usize,
}

impl Vectors {
    fn new(rng: &mut StdRng, clusters: usize, dim: usize) -> Self {
        let centres = (0..clusters)
            .map(|_| {
                let mut c: Vec<f32> = (0..dim).map(|_| gauss(rng)).collect();
                normalize(&mut c);
                c
            })
            .collect();
        Self { centres, dim }
    }

    fn sample(&self, rng: &mut StdRng) -> Vec<f32> {
        let c = &self.centres[rng.random_range(0..self.centres.len())];
        let sigma = 1.0 / (self.dim as f32).sqrt();
        let mut v: Vec<f32> = c.iter().map(|x| x + sigma * gauss(rng)).collect();
        normalize(&mut v);
        v
    }
}

fn word(rng: &mut StdRng) -> String {
    // Zipf-like: frequent words are frequent
    let u: f64 = rng.random();
    let i = ((u * u * u) * VOCABULARY as f64) as usize;
    format!("term{i}")
}

fn words(rng: &mut StdRng, n: usize) -> String {
    (0..n).map(|_| word(rng)).collect::<Vec<_>>().join(" ")
}

struct User {
    label: &'static str,
    id: Uuid,
    conversation: Uuid,
}

async fn tenancy(
    pool: &PgPool,
    args: &RetrievalArgs,
    rng: &mut StdRng,
) -> anyhow::Result<(Uuid, Vec<Uuid>, Vec<User>)> {
    let mut c = pool.acquire().await?;
    let org = store::tenancy::insert_org(&mut c, "bench").await?.id;
    let mut user = async |role: store::Role, name: &str| -> anyhow::Result<Uuid> {
        let id = store::tenancy::insert_user(
            &mut c,
            &format!("{name}-{}@bench.test", Uuid::new_v4().simple()),
            name,
            "x",
        )
        .await?
        .id;
        store::tenancy::insert_membership(&mut c, org, id, role).await?;
        anyhow::Ok(id.into_uuid())
    };
    let admin = user(store::Role::Admin, "admin").await?;
    let one = user(store::Role::Member, "one").await?;
    let ten = user(store::Role::Member, "ten").await?;
    let mut projects = Vec::with_capacity(args.projects);
    for _ in 0..args.projects {
        let p = store::projects::insert_project(
            &mut c,
            &store::projects::NewProject {
                org_id: org,
                created_by: admin.into(),
                name: "p",
                description: "",
                visibility: store::Visibility::Private,
                team_id: None,
            },
        )
        .await?
        .id;
        projects.push(p);
    }
    // random memberships: 1 % and 10 % of the projects
    let mut order = projects.clone();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    for p in &order[..args.projects / 100] {
        store::projects::add_member(&mut c, org, *p, one.into()).await?;
    }
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    for p in &order[..args.projects / 10] {
        store::projects::add_member(&mut c, org, *p, ten.into()).await?;
    }
    let mut users = Vec::new();
    for (label, id) in [("1%", one), ("10%", ten), ("100%", admin)] {
        let conversation = store::conversations::create(&mut c, org.into(), id, "bench", None)
            .await?
            .id;
        users.push(User {
            label,
            id,
            conversation,
        });
    }
    Ok((
        org.into(),
        projects.into_iter().map(Into::into).collect(),
        users,
    ))
}

/// COPY the generated chunks in; returns the seconds it took.
async fn load(
    pool: &PgPool,
    args: &RetrievalArgs,
    org: Uuid,
    projects: &[Uuid],
    vectors: &Vectors,
    rng: &mut StdRng,
) -> anyhow::Result<f64> {
    use std::fmt::Write;
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    let mut copy = conn
        .copy_in_raw(
            "COPY embeddings (id, org_id, source_kind, source_id, chunk_index, project_id, \
             allowed_user_ids, title, content, content_hash, model, dim, embedding) FROM STDIN",
        )
        .await?;
    let nobody = Uuid::new_v4();
    let mut buf = String::with_capacity(8 << 20);
    let per_source = args.chunks_per_source.max(1);
    let (mut project, mut allowed, mut source) = (projects[0], String::new(), Uuid::nil());
    for i in 0..args.chunks {
        if i % per_source == 0 {
            project = projects[rng.random_range(0..projects.len())];
            allowed = if rng.random_ratio(2, 100) {
                format!("{{{nobody}}}")
            } else {
                "{}".to_owned()
            };
            source = Uuid::now_v7();
        }
        let text = words(rng, 24);
        let v = vectors.sample(rng);
        write!(
            buf,
            "{}\t{org}\tdocument\t{source}\t{}\t{project}\t{allowed}\tchunk {i}\t{text}\t\\\\x{:08x}\t{MODEL}\t{}\t[",
            Uuid::now_v7(),
            i % per_source,
            i,
            args.dim
        )?;
        for (j, x) in v.iter().enumerate() {
            if j > 0 {
                buf.push(',');
            }
            write!(buf, "{x:.5}")?;
        }
        buf.push_str("]\n");
        if buf.len() > (4 << 20) {
            copy.send(buf.as_bytes()).await?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        copy.send(buf.as_bytes()).await?;
    }
    copy.finish().await?;
    Ok(started.elapsed().as_secs_f64())
}

/// A plan line without its long literals (the query vector, the id arrays).
fn elide_literals(line: &str) -> String {
    let mut out = String::with_capacity(line.len().min(400));
    let mut rest = line;
    while let Some(start) = rest.find('\'') {
        out.push_str(&rest[..=start]);
        let after = &rest[start + 1..];
        let end = after.find('\'').unwrap_or(after.len());
        let literal = &after[..end];
        if literal.len() > 60 {
            out.push_str(&literal[..24]);
            out.push('…');
        } else {
            out.push_str(literal);
        }
        rest = after.get(end..).unwrap_or("");
        if let Some(r) = rest.strip_prefix('\'') {
            out.push('\'');
            rest = r;
        }
    }
    out.push_str(rest);
    out
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

#[allow(clippy::print_stdout)]
async fn run(db: &ScratchDb, args: &RetrievalArgs) -> anyhow::Result<()> {
    let options: PgConnectOptions = db.url.parse().context("scratch database URL")?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.clone())
        .await?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let dim = usize::try_from(args.dim)?;
    let vectors = Vectors::new(&mut rng, args.clusters, dim);
    let (org, users) = if args.reuse.is_some() {
        kept_tenancy(&pool).await?
    } else {
        let (org, users) = load_and_index(&pool, &options, args, &vectors, &mut rng).await?;
        (org, users)
    };
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM embeddings")
        .fetch_one(&pool)
        .await?;
    query(&pool, args, &vectors, &mut rng, org, &users, chunks).await?;
    pool.close().await;
    Ok(())
}

/// The org and the three users of a kept database (made by [`tenancy`]).
async fn kept_tenancy(pool: &PgPool) -> anyhow::Result<(Uuid, Vec<User>)> {
    let org: Uuid = sqlx::query_scalar("SELECT id FROM organizations WHERE name = 'bench'")
        .fetch_one(pool)
        .await
        .context("the kept database has no bench org")?;
    let mut users = Vec::new();
    for (label, name) in [("1%", "one"), ("10%", "ten"), ("100%", "admin")] {
        let (id, conversation): (Uuid, Uuid) = sqlx::query_as(
            "SELECT u.id, c.id FROM users u JOIN conversations c ON c.user_id = u.id
             WHERE u.name = $1 AND c.org_id = $2 LIMIT 1",
        )
        .bind(name)
        .bind(org)
        .fetch_one(pool)
        .await
        .with_context(|| format!("the kept database has no user {name}"))?;
        users.push(User {
            label,
            id,
            conversation,
        });
    }
    Ok((org, users))
}

#[allow(clippy::print_stdout)]
async fn load_and_index(
    pool: &PgPool,
    options: &PgConnectOptions,
    args: &RetrievalArgs,
    vectors: &Vectors,
    rng: &mut StdRng,
) -> anyhow::Result<(Uuid, Vec<User>)> {
    let (org, projects, users) = tenancy(pool, args, rng).await?;
    let load_s = load(pool, args, org, &projects, vectors, rng).await?;
    println!(
        "retrieval: loaded chunks={} in {load_s:.1} s ({:.0} chunks/s, COPY, dim {})",
        args.chunks,
        args.chunks as f64 / load_s,
        args.dim
    );
    let started = Instant::now();
    // what autovacuum does to a table in steady state: the visibility map set (index-only
    // scans, such as the exact-search decision's count, need it) and statistics
    pool.execute("VACUUM ANALYZE embeddings").await?;
    {
        // the production index, built after loading with room to build in memory
        let build = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(
                options
                    .clone()
                    .options([("maintenance_work_mem", "4GB")])
                    .log_slow_statements(log::LevelFilter::Off, std::time::Duration::ZERO),
            )
            .await?;
        store::embeddings::ensure_vector_index(&build, args.dim).await?;
        build.close().await;
    }
    pool.execute("ANALYZE embeddings").await?;
    println!(
        "retrieval: vacuum + hnsw index built in {:.1} s (m=16, ef_construction=64)",
        started.elapsed().as_secs_f64()
    );
    Ok((org, users))
}

#[allow(clippy::print_stdout)]
async fn query(
    pool: &PgPool,
    args: &RetrievalArgs,
    vectors: &Vectors,
    rng: &mut StdRng,
    org: Uuid,
    users: &[User],
    chunks: i64,
) -> anyhow::Result<()> {
    let tuning = Tuning {
        candidates: 40,
        ef_search: args.ef_search,
        max_scan_tuples: args.max_scan_tuples,
        exact_max_rows: args.exact_max_rows,
        stopword_min_rows: args.stopword_min_rows,
    };
    let mut last = (0.0, 0.0);
    for user in users {
        let mut ann = Vec::with_capacity(args.queries);
        let mut hybrid = Vec::with_capacity(args.queries);
        let mut reference_ms = Vec::with_capacity(args.queries);
        let mut exact_scans = 0usize;
        let mut hits = 0usize;
        let mut expected = 0usize;
        let mut short = 0usize;
        for q in 0..args.queries + 20 {
            let v = pgvector::Vector::from(vectors.sample(rng));
            let text = words(rng, 3);
            let query = Query {
                org_id: org.into(),
                user_id: user.id.into(),
                conversation_id: user.conversation.into(),
                embedding: Some(&v),
                text: &text,
                model: MODEL,
                dim: args.dim,
                k: 10,
                exclude_message_ids: &[],
            };
            let mut conn = pool.acquire().await?;
            let t = Instant::now();
            let (approx, was_exact) =
                retrieval::nearest(&mut conn, &query, &tuning, 10, Nearest::Auto).await?;
            let ann_ms = ms(t);
            let t = Instant::now();
            let fused = retrieval::search(&mut conn, &query, &tuning).await?;
            let hybrid_ms = ms(t);
            let t = Instant::now();
            let (exact, _) =
                retrieval::nearest(&mut conn, &query, &tuning, 10, Nearest::Reference).await?;
            let brute_ms = ms(t);
            if q < 20 {
                continue;
            }
            ann.push(ann_ms);
            hybrid.push(hybrid_ms);
            reference_ms.push(brute_ms);
            exact_scans += usize::from(was_exact);
            expected += exact.len();
            hits += exact.iter().filter(|id| approx.contains(id)).count();
            if fused.len() < 10 || approx.len() < exact.len() {
                short += 1;
            }
        }
        let (ann, hybrid, brute) = (
            Samples::new(ann),
            Samples::new(hybrid),
            Samples::new(reference_ms),
        );
        let recall = if expected == 0 {
            f64::NAN
        } else {
            hits as f64 / expected as f64
        };
        println!(
            "retrieval: visible={:<5} ann_p50_ms={:.2} ann_p95_ms={:.2} recall_at_10={recall:.3} hybrid_p50_ms={:.2} hybrid_p95_ms={:.2} exact_scans={exact_scans}/{n} brute_force_p50_ms={:.2} brute_force_p95_ms={:.2} short_results={short}/{n}",
            user.label,
            ann.p50(),
            ann.pct(0.95),
            hybrid.p50(),
            hybrid.pct(0.95),
            brute.p50(),
            brute.pct(0.95),
            n = ann.len()
        );
        if user.label == "1%" {
            last = (hybrid.pct(0.95), recall);
        }
    }
    if args.explain {
        let v = pgvector::Vector::from(vectors.sample(rng));
        for user in users {
            println!(
                "retrieval: EXPLAIN of the vector list, {} visible:",
                user.label
            );
            let query = Query {
                org_id: org.into(),
                user_id: user.id.into(),
                conversation_id: user.conversation.into(),
                embedding: Some(&v),
                text: "",
                model: MODEL,
                dim: args.dim,
                k: 10,
                exclude_message_ids: &[],
            };
            let mut conn = pool.acquire().await?;
            for line in retrieval::explain_nearest(&mut conn, &query, &tuning, 40).await? {
                println!("  {}", elide_literals(&line));
            }
            let text = words(rng, 3);
            println!(
                "retrieval: EXPLAIN of the hybrid search, {} visible, text {text:?}:",
                user.label
            );
            let hybrid = Query {
                text: &text,
                ..query.clone()
            };
            for line in retrieval::explain_search(&mut conn, &hybrid, &tuning).await? {
                println!("  {}", elide_literals(&line));
            }
        }
    }
    println!(
        "retrieval: chunks={chunks} p95_ms={:.2} recall_at_10={:.3} (1% visible)",
        last.0, last.1
    );
    Ok(())
}
