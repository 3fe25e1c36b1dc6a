//! `bench memory`: the cost of memory in a chat turn and of storing facts, at full capacity.
//!
//! A scratch database gets one org holding `capacity_org` entries, `--projects` org-visible
//! projects holding `capacity_project` entries each, and one user holding `capacity_user`,
//! every entry with a random unit vector of `EMBEDDING_DIM` dimensions. Then:
//! - `store::memory::for_prompt` for that user (the visibility filter + an exact cosine scan
//!   over every visible entry), `--samples` times;
//! - `store::memory::insert` into the full user tier (owner lock, de-duplication scan, insert,
//!   trim), sequentially, and from 16 concurrent tasks on the same owner.

use std::time::Instant;

use rand::Rng;
use store::Role;
use store::memory::{self, NewEntry, Owner};

use crate::scratch::ScratchDb;
use crate::stats::Samples;

#[derive(clap::Args)]
pub struct MemoryArgs {
    /// Org-visible projects, each filled to the project capacity.
    #[arg(long, default_value_t = 10)]
    projects: usize,
    /// Prompt reads (and sequential inserts) measured.
    #[arg(long, default_value_t = 300)]
    samples: usize,
}

fn random_unit(dim: usize) -> Vec<f32> {
    let mut rng = rand::rng();
    let mut v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-9);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

fn entry(owner: Owner, i: usize, model: &str, dim: usize) -> NewEntry {
    NewEntry {
        owner,
        content: format!("remembered fact number {i} about the work of this owner"),
        source_conversation_id: None,
        source_message_ids: Vec::new(),
        author_user_id: None,
        provenance: Default::default(),
        embedding: Some((model.to_owned(), random_unit(dim))),
    }
}

async fn fill(
    pool: &sqlx::PgPool,
    owner: Owner,
    n: u32,
    model: &str,
    dim: usize,
    capacity: u32,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    for i in 0..n as usize {
        memory::insert(&mut tx, &entry(owner, i, model, dim), capacity, 0.0).await?;
    }
    tx.commit().await?;
    Ok(())
}

#[allow(clippy::print_stdout)]
pub async fn bench_memory(settings: config::Settings, args: MemoryArgs) -> anyhow::Result<()> {
    let db = ScratchDb::create(&settings.database.url).await?;
    let result = run(&settings, &db, &args).await;
    db.drop_db().await;
    result
}

#[allow(clippy::print_stdout)]
async fn run(settings: &config::Settings, db: &ScratchDb, args: &MemoryArgs) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .connect(&db.url)
        .await?;
    let m = &settings.memory;
    let dim = settings.embedding.dim as usize;
    let model = settings.embedding.model.as_str();
    let mut c = pool.acquire().await?;
    let org = store::tenancy::insert_org(&mut c, "bench").await?.id;
    let user = store::tenancy::insert_user(&mut c, "bench@example.com", "B", "x")
        .await?
        .id;
    store::tenancy::insert_membership(&mut c, org, user, Role::Member).await?;
    let mut projects = Vec::new();
    for i in 0..args.projects {
        let name = format!("p{i}");
        let p = store::projects::insert_project(
            &mut c,
            &store::projects::NewProject {
                org_id: org,
                created_by: user,
                name: &name,
                description: "",
                visibility: store::Visibility::Org,
                team_id: None,
            },
        )
        .await?;
        projects.push(p.id);
    }
    let conversation = store::conversations::create(&mut c, org.into(), user.into(), "bench", None)
        .await?
        .id;
    drop(c);
    fill(
        &pool,
        Owner::org(org.into()),
        m.capacity_org,
        model,
        dim,
        m.capacity_org,
    )
    .await?;
    for p in &projects {
        fill(
            &pool,
            Owner::project(org.into(), (*p).into()),
            m.capacity_project,
            model,
            dim,
            m.capacity_project,
        )
        .await?;
    }
    fill(
        &pool,
        Owner::user(org.into(), user.into()),
        m.capacity_user,
        model,
        dim,
        m.capacity_user,
    )
    .await?;
    let visible = u64::from(m.capacity_org)
        + u64::from(m.capacity_project) * args.projects as u64
        + u64::from(m.capacity_user);
    println!(
        "memory entries visible to the user: {visible} (org {}, {} projects x {}, user {}), {dim}-d vectors",
        m.capacity_org, args.projects, m.capacity_project, m.capacity_user
    );

    // prompt reads
    let mut samples = Vec::with_capacity(args.samples);
    let mut conn = pool.acquire().await?;
    for _ in 0..args.samples {
        let q = random_unit(dim);
        let t = Instant::now();
        let got = memory::for_prompt(&mut conn, user.into(), conversation, Some((model, &q)), 200)
            .await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(!got.is_empty(), "no entries read");
    }
    drop(conn);
    let s = Samples::new(samples);
    println!(
        "for_prompt (visibility filter + exact cosine ranking, top 200): p50 {:.2} ms  p99 {:.2} ms  mean {:.2} ms  ({} samples)",
        s.p50(),
        s.p99(),
        s.mean(),
        s.len()
    );

    // sequential inserts into the full user tier (each one trims one)
    let owner = Owner::user(org.into(), user.into());
    let mut samples = Vec::with_capacity(args.samples);
    for i in 0..args.samples {
        let e = entry(owner, 10_000 + i, model, dim);
        let t = Instant::now();
        let mut tx = pool.begin().await?;
        memory::insert(&mut tx, &e, m.capacity_user, m.dedup_distance).await?;
        tx.commit().await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let s = Samples::new(samples);
    println!(
        "insert at capacity (lock + dedup scan + insert + trim, committed): p50 {:.2} ms  p99 {:.2} ms",
        s.p50(),
        s.p99()
    );

    // concurrent inserts on the same owner: serialised by its lock
    let tasks = 16;
    let per_task = (args.samples / tasks).max(1);
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for k in 0..tasks {
        let pool = pool.clone();
        let model = model.to_owned();
        let cap = m.capacity_user;
        let dd = m.dedup_distance;
        set.spawn(async move {
            for i in 0..per_task {
                let e = entry(owner, 100_000 + k * 1000 + i, &model, dim);
                let mut tx = pool.begin().await?;
                memory::insert(&mut tx, &e, cap, dd).await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let secs = t.elapsed().as_secs_f64();
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversation_memories WHERE tier = 'user' AND user_id = $1",
    )
    .bind(user)
    .fetch_one(&pool)
    .await?;
    println!(
        "concurrent inserts, one owner, {tasks} tasks: {:.0} inserts/s ({} in {secs:.2} s); entries left {left} (capacity {})",
        (tasks * per_task) as f64 / secs,
        tasks * per_task,
        m.capacity_user
    );
    pool.close().await;
    Ok(())
}
