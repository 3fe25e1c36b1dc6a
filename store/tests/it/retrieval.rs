//! `store::retrieval::search`: reciprocal rank fusion of the vector and full-text lists, and
//! the live visibility filter (projects, restricted documents, message owners, narrowing,
//! deletion, other orgs), evaluated on every call.

use store::retrieval::{self, Chunk, Nearest, Query, Tuning};
use store::{Role, Visibility};
use testkit::TestDb;
use testkit::fake_upstream::fake_embedding;
use testkit::retrieval as fx;
use uuid::Uuid;

const MODEL: &str = "fake/embed";
const DIM: usize = 384;

async fn search_as(
    db: &TestDb,
    org: Uuid,
    user: Uuid,
    conversation: Uuid,
    text: &str,
    embed: Option<&str>,
) -> Vec<Chunk> {
    let v = embed.map(|t| pgvector::Vector::from(fake_embedding(t, DIM)));
    let mut c = db.pool.acquire().await.unwrap();
    let q = Query {
        org_id: org.into(),
        user_id: user.into(),
        conversation_id: conversation.into(),
        embedding: v.as_ref(),
        text,
        model: MODEL,
        dim: DIM as u32,
        k: 6,
        exclude_message_ids: &[],
    };
    // the small test sets take the exact form; the HNSW form (exact_max_rows 0) must
    // give the same answer on them (the graph holds every row within ef_search)
    let exact = retrieval::search(&mut c, &q, &Tuning::default())
        .await
        .unwrap();
    let hnsw = retrieval::search(
        &mut c,
        &q,
        &Tuning {
            exact_max_rows: 0,
            ..Tuning::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(exact, hnsw, "the exact and the HNSW form disagree");
    exact
}

/// A task chunk titled "T" whose text is also what it is embedded as.
fn task_chunk(org: Uuid, project: Uuid, text: &str) -> store::embeddings::NewChunk {
    fx::project_chunk(
        org,
        project,
        "task",
        Uuid::now_v7(),
        "T",
        text,
        text,
        MODEL,
        DIM,
    )
}

fn contents(chunks: &[Chunk]) -> Vec<&str> {
    chunks.iter().map(|c| c.content.as_str()).collect()
}

#[tokio::test]
async fn rank_fusion_returns_a_text_only_hit_and_a_vector_only_hit_and_ranks_a_double_hit_first() {
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let org = fx::org(&mut c).await;
    let user = fx::user(&mut c, org, Role::Member).await;
    let p = fx::project(&mut c, org, user, Visibility::Org, None).await;
    let conv = store::conversations::create(&mut c, org, user, "c", None)
        .await
        .unwrap()
        .id;
    let query = "where is the quarterly zeppelin budget";
    let mut chunks = vec![
        // only the words match (its vector is of other text)
        fx::project_chunk(
            org,
            p,
            "task",
            Uuid::now_v7(),
            "Zeppelin",
            "the zeppelin budget sheet",
            "other words",
            MODEL,
            DIM,
        ),
        // only the vector matches (the query's own embedding), no shared word
        fx::project_chunk(
            org,
            p,
            "task",
            Uuid::now_v7(),
            "Notes",
            "figures for next term",
            query,
            MODEL,
            DIM,
        ),
    ];
    for i in 0..20 {
        let text = format!("filler number {i} about gardening");
        chunks.push(fx::project_chunk(
            org,
            p,
            "task",
            Uuid::now_v7(),
            "F",
            &text,
            &text,
            MODEL,
            DIM,
        ));
    }
    fx::insert(&mut c, &chunks).await;

    let got = search_as(&db, org, user, conv, query, Some(query)).await;
    assert_eq!(got.len(), 6, "top k: {:?}", contents(&got));
    let text_hit = got
        .iter()
        .find(|c| c.content == "the zeppelin budget sheet")
        .expect("the full-text hit");
    assert_eq!(text_hit.text_rank, Some(1));
    let vector_hit = got
        .iter()
        .find(|c| c.content == "figures for next term")
        .expect("the vector hit");
    assert_eq!(vector_hit.vector_rank, Some(1));
    assert_eq!(vector_hit.text_rank, None);
    assert!(
        (vector_hit.score - 1.0 / 61.0).abs() < 1e-9,
        "{}",
        vector_hit.score
    );
    assert_eq!(vector_hit.source_kind, "task");
    assert_eq!(vector_hit.project_id, Some(Into::into(p)));
    // the two rank-1 hits lead; scores never increase down the list
    assert!(got.windows(2).all(|w| w[0].score >= w[1].score));

    // a chunk in both lists outranks both single-list winners
    let both = fx::project_chunk(
        org,
        p,
        "document",
        Uuid::now_v7(),
        "Budget",
        "zeppelin budget plan",
        query,
        MODEL,
        DIM,
    );
    fx::insert(&mut c, &[both]).await;
    let got = search_as(&db, org, user, conv, query, Some(query)).await;
    assert_eq!(
        got[0].content,
        "zeppelin budget plan",
        "{:?}",
        contents(&got)
    );
    assert!(got[0].vector_rank.is_some() && got[0].text_rank.is_some());

    // no embedding (the embedder is down): full text alone still answers
    let got = search_as(&db, org, user, conv, query, None).await;
    assert!(got.iter().all(|c| c.vector_rank.is_none()));
    let mut words = contents(&got);
    words.sort();
    assert_eq!(words, ["the zeppelin budget sheet", "zeppelin budget plan"]);
    // an embedding of another model's rows finds nothing of this model
    let mut c2 = db.pool.acquire().await.unwrap();
    let v = pgvector::Vector::from(fake_embedding(query, DIM));
    let other = retrieval::search(
        &mut c2,
        &Query {
            org_id: org.into(),
            user_id: user.into(),
            conversation_id: conv.into(),
            embedding: Some(&v),
            text: query,
            model: "fake/other",
            dim: DIM as u32,
            k: 6,
            exclude_message_ids: &[],
        },
        &Tuning::default(),
    )
    .await
    .unwrap();
    assert!(other.is_empty(), "{other:?}");
}

#[tokio::test]
async fn the_filter_is_live_for_projects_restrictions_messages_narrowing_deletion_and_orgs() {
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let org = fx::org(&mut c).await;
    let owner = fx::user(&mut c, org, Role::Owner).await;
    let alice = fx::user(&mut c, org, Role::Member).await;
    let bob = fx::user(&mut c, org, Role::Member).await;
    let carol = fx::user(&mut c, org, Role::Member).await;
    let team = store::tenancy::insert_team(&mut c, org.into(), "t")
        .await
        .unwrap()
        .id;
    store::tenancy::add_team_member(&db.pool, org.into(), team, carol.into())
        .await
        .unwrap();
    let private = fx::project(&mut c, org, alice, Visibility::Private, None).await;
    store::projects::add_member(&mut c, org.into(), private.into(), bob.into())
        .await
        .unwrap();
    store::projects::add_member(&mut c, org.into(), private.into(), carol.into())
        .await
        .unwrap();
    let open = fx::project(&mut c, org, owner, Visibility::Org, None).await;
    let doc = fx::document(&mut c, org, private, "Secret plan").await;
    let restricted_doc = fx::document(&mut c, org, private, "For some").await;
    let alice_msg = Uuid::now_v7();
    let mut restricted = fx::project_chunk(
        org,
        private,
        "document",
        restricted_doc,
        "For some",
        "marker restricted ostrich",
        "marker restricted ostrich",
        MODEL,
        DIM,
    );
    restricted.allowed_user_ids = vec![bob.into()];
    restricted.allowed_team_ids = vec![team];
    fx::insert(
        &mut c,
        &[
            fx::project_chunk(
                org,
                private,
                "document",
                doc,
                "Secret plan",
                "marker private pelican",
                "marker private pelican",
                MODEL,
                DIM,
            ),
            fx::project_chunk(
                org,
                open,
                "task",
                Uuid::now_v7(),
                "Open",
                "marker open flamingo",
                "marker open flamingo",
                MODEL,
                DIM,
            ),
            restricted,
            fx::message_chunk(org, alice, alice_msg, "marker message heron", MODEL, DIM),
        ],
    )
    .await;
    // another org with the same words
    let org2 = fx::org(&mut c).await;
    let mallory = fx::user(&mut c, org2, Role::Owner).await;
    let p2 = fx::project(&mut c, org2, mallory, Visibility::Org, None).await;
    fx::insert(
        &mut c,
        &[fx::project_chunk(
            org2,
            p2,
            "task",
            Uuid::now_v7(),
            "X",
            "marker foreign crane",
            "marker foreign crane",
            MODEL,
            DIM,
        )],
    )
    .await;

    let mut convs = std::collections::HashMap::new();
    for u in [owner, alice, bob, carol] {
        convs.insert(
            u,
            store::conversations::create(&mut c, org, u, "c", None)
                .await
                .unwrap()
                .id,
        );
    }
    let conv_m = store::conversations::create(&mut c, org2, mallory, "c", None)
        .await
        .unwrap()
        .id;
    let seen = |got: Vec<Chunk>| {
        let mut words: Vec<String> = got
            .iter()
            .map(|c| c.content.split(' ').nth(1).unwrap().to_owned())
            .collect();
        words.sort();
        words
    };
    let q = "marker";
    assert_eq!(
        seen(search_as(&db, org, alice, convs[&alice], q, Some(q)).await),
        ["message", "open", "private"]
    );
    assert_eq!(
        seen(search_as(&db, org, bob, convs[&bob], q, Some(q)).await),
        ["open", "private", "restricted"]
    );
    assert_eq!(
        seen(search_as(&db, org, carol, convs[&carol], q, Some(q)).await),
        ["open", "private", "restricted"],
        "through her team"
    );
    // the owner sees every project, but not alice's messages nor the restricted document
    assert_eq!(
        seen(search_as(&db, org, owner, convs[&owner], q, Some(q)).await),
        ["open", "private"]
    );
    assert_eq!(
        seen(search_as(&db, org2, mallory, conv_m, q, Some(q)).await),
        ["foreign"]
    );
    // a user asking with another org's id, or in someone else's conversation, gets nothing
    assert!(
        search_as(&db, org, mallory, conv_m, q, Some(q))
            .await
            .is_empty()
    );
    assert!(
        search_as(&db, org, bob, convs[&alice], q, Some(q))
            .await
            .is_empty()
    );

    // live: carol leaves the team, bob leaves the project
    store::tenancy::remove_team_member(&db.pool, org.into(), team, carol.into())
        .await
        .unwrap();
    assert_eq!(
        seen(search_as(&db, org, carol, convs[&carol], q, Some(q)).await),
        ["open", "private"]
    );
    store::projects::remove_member(&mut c, private.into(), bob.into())
        .await
        .unwrap();
    assert_eq!(
        seen(search_as(&db, org, bob, convs[&bob], q, Some(q)).await),
        ["open"]
    );
    // narrowing: alice's conversation about the open project only
    let narrow = store::conversations::create(&mut c, org, alice, "n", Some(&[open]))
        .await
        .unwrap()
        .id;
    assert_eq!(
        seen(search_as(&db, org, alice, narrow, q, Some(q)).await),
        ["message", "open"]
    );
    // deleted document: marked deleted, rows still there (before any re-index)
    sqlx::query("UPDATE documents SET deleted_at = now() WHERE id = $1")
        .bind(doc)
        .execute(&mut *c)
        .await
        .unwrap();
    assert_eq!(
        seen(search_as(&db, org, alice, convs[&alice], q, Some(q)).await),
        ["message", "open"]
    );
    assert_eq!(
        seen(search_as(&db, org, alice, convs[&alice], q, None).await),
        ["message", "open"],
        "full text too"
    );
    // removed from the org: nothing at all, own messages included
    store::tenancy::remove_member(&db.pool, org.into(), alice.into())
        .await
        .unwrap();
    assert!(
        search_as(&db, org, alice, convs[&alice], q, Some(q))
            .await
            .is_empty()
    );
}

/// A member who sees one private project of two, `n` task chunks ("chunk {i}") spread over
/// them (`is_mine(i)`: in the member's), statistics analyzed, and a conversation of theirs.
struct Scene {
    db: TestDb,
    c: sqlx::pool::PoolConnection<sqlx::Postgres>,
    org: Uuid,
    user: Uuid,
    mine: Uuid,
    conv: Uuid,
}

impl Scene {
    async fn new(n: usize, is_mine: impl Fn(usize) -> bool) -> Self {
        let db = TestDb::new().await;
        let mut c = db.pool.acquire().await.unwrap();
        let org = fx::org(&mut c).await;
        let owner = fx::user(&mut c, org, Role::Owner).await;
        let user = fx::user(&mut c, org, Role::Member).await;
        let mine = fx::project(&mut c, org, user, Visibility::Private, None).await;
        let others = fx::project(&mut c, org, owner, Visibility::Private, None).await;
        let chunks: Vec<_> = (0..n)
            .map(|i| {
                let text = format!("chunk {i}");
                let p = if is_mine(i) { mine } else { others };
                task_chunk(org, p, &text)
            })
            .collect();
        fx::insert(&mut c, &chunks).await;
        sqlx::query("ANALYZE embeddings")
            .execute(&mut *c)
            .await
            .unwrap();
        let conv = store::conversations::create(&mut c, org, user, "c", None)
            .await
            .unwrap()
            .id;
        Self {
            db,
            c,
            org,
            user,
            mine,
            conv,
        }
    }
}

#[tokio::test]
async fn the_recent_window_is_excluded_and_a_one_percent_user_still_gets_k_results() {
    // 1 000 chunks, 1 % of them visible to `user`: the HNSW scan must walk past the hidden
    // 99 % (iterative scan) instead of returning the few visible rows among its first ef_search
    let Scene {
        db: _db,
        mut c,
        org,
        user,
        mine,
        conv,
    } = Scene::new(1000, |i| i % 100 == 7).await;
    let v = pgvector::Vector::from(fake_embedding("anything", DIM));
    let q = Query {
        org_id: org.into(),
        user_id: user.into(),
        conversation_id: conv.into(),
        embedding: Some(&v),
        text: "",
        model: MODEL,
        dim: DIM as u32,
        k: 6,
        exclude_message_ids: &[],
    };
    // exact_max_rows 0: the HNSW scan whatever the visible set's size (what this test is about)
    let tuning = Tuning {
        candidates: 10,
        ef_search: 10,
        max_scan_tuples: 20_000,
        exact_max_rows: 0,
        ..Tuning::default()
    };
    let (approx, was_exact) = retrieval::nearest(&mut c, &q, &tuning, 10, Nearest::Auto)
        .await
        .unwrap();
    assert!(!was_exact);
    let (exact, _) = retrieval::nearest(&mut c, &q, &tuning, 10, Nearest::Reference)
        .await
        .unwrap();
    assert_eq!(exact.len(), 10);
    assert_eq!(
        approx.len(),
        10,
        "the iterative scan found all 10 visible rows"
    );
    let got = retrieval::search(&mut c, &q, &tuning).await.unwrap();
    assert_eq!(got.len(), 6);
    assert!(got.iter().all(|c| c.project_id == Some(mine.into())));

    // message chunks of the recent window are left out when asked
    let m1 = Uuid::now_v7();
    let m2 = Uuid::now_v7();
    fx::insert(
        &mut c,
        &[
            fx::message_chunk(org, user, m1, "window walrus", MODEL, DIM),
            fx::message_chunk(org, user, m2, "older walrus", MODEL, DIM),
        ],
    )
    .await;
    let v = pgvector::Vector::from(fake_embedding("walrus", DIM));
    let got = retrieval::search(
        &mut c,
        &Query {
            embedding: Some(&v),
            text: "walrus",
            exclude_message_ids: &[m1.into()],
            ..q.clone()
        },
        &Tuning::default(),
    )
    .await
    .unwrap();
    let words = contents(&got);
    assert!(
        words.contains(&"older walrus") && !words.contains(&"window walrus"),
        "{words:?}"
    );
}

#[tokio::test]
async fn a_filtered_hnsw_scan_keeps_going_until_enough_rows_pass_the_filter() {
    // half of 2 000 chunks visible: the planner takes the HNSW index; with ef_search = 10 a
    // plain scan would stop after ~10 candidates (~5 visible), the iterative one goes on
    let Scene {
        db: _db,
        mut c,
        org,
        user,
        mine,
        conv,
    } = Scene::new(2000, |i| i % 2 == 0).await;
    let v = pgvector::Vector::from(fake_embedding("anything", DIM));
    let q = Query {
        org_id: org.into(),
        user_id: user.into(),
        conversation_id: conv.into(),
        embedding: Some(&v),
        text: "",
        model: MODEL,
        dim: DIM as u32,
        k: 6,
        exclude_message_ids: &[],
    };
    // 1 000 visible rows, above exact_max_rows: the HNSW scan
    let tuning = Tuning {
        candidates: 10,
        ef_search: 10,
        max_scan_tuples: 20_000,
        exact_max_rows: 999,
        ..Tuning::default()
    };
    let plan = retrieval::explain_nearest(&mut c, &q, &tuning, 40)
        .await
        .unwrap()
        .join("\n");
    assert!(plan.contains("embeddings_hnsw_d384"), "{plan}");
    let (approx, was_exact) = retrieval::nearest(&mut c, &q, &tuning, 40, Nearest::Auto)
        .await
        .unwrap();
    assert!(!was_exact);
    let (exact, _) = retrieval::nearest(&mut c, &q, &tuning, 40, Nearest::Reference)
        .await
        .unwrap();
    assert_eq!(approx.len(), 40, "{plan}");
    let visible: std::collections::HashSet<Uuid> =
        sqlx::query_scalar("SELECT id FROM embeddings WHERE project_id = $1")
            .bind(mine)
            .fetch_all(&mut *c)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(approx.iter().all(|id| visible.contains(id)));
    let hits = exact.iter().filter(|id| approx.contains(id)).count();
    assert!(hits >= 30, "recall@40 {hits}/40");
}

#[tokio::test]
async fn a_small_visible_set_is_searched_exactly_without_the_hnsw_index() {
    // 100 visible rows among 2 000
    let Scene {
        db: _db,
        mut c,
        org,
        user,
        mine,
        conv,
    } = Scene::new(2000, |i| i % 20 == 0).await;
    let v = pgvector::Vector::from(fake_embedding("anything", DIM));
    let q = Query {
        org_id: org.into(),
        user_id: user.into(),
        conversation_id: conv.into(),
        embedding: Some(&v),
        text: "chunk",
        model: MODEL,
        dim: DIM as u32,
        k: 10,
        exclude_message_ids: &[],
    };
    let at = |exact_max_rows| Tuning {
        candidates: 40,
        ef_search: 10,
        max_scan_tuples: 20_000,
        exact_max_rows,
        ..Tuning::default()
    };
    let (reference, _) = retrieval::nearest(&mut c, &q, &at(100), 40, Nearest::Reference)
        .await
        .unwrap();
    assert_eq!(reference.len(), 40);

    // at the threshold: exact, no graph walk, the reference answer itself
    let plan = retrieval::explain_nearest(&mut c, &q, &at(100), 40)
        .await
        .unwrap()
        .join("\n");
    assert!(!plan.contains("embeddings_hnsw"), "{plan}");
    let (ids, was_exact) = retrieval::nearest(&mut c, &q, &at(100), 40, Nearest::Auto)
        .await
        .unwrap();
    assert!(was_exact);
    assert_eq!(ids, reference);
    let plan = retrieval::explain_search(&mut c, &q, &at(100))
        .await
        .unwrap()
        .join("\n");
    assert!(!plan.contains("embeddings_hnsw"), "{plan}");
    let got = retrieval::search(&mut c, &q, &at(100)).await.unwrap();
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|c| c.project_id == Some(mine.into())));

    // one row over: the HNSW index
    let (_, was_exact) = retrieval::nearest(&mut c, &q, &at(99), 40, Nearest::Auto)
        .await
        .unwrap();
    assert!(!was_exact);
}

#[tokio::test]
async fn the_corpus_most_common_terms_are_left_out_of_the_full_text_query() {
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let org = fx::org(&mut c).await;
    let user = fx::user(&mut c, org, Role::Owner).await;
    let p = fx::project(&mut c, org, user, Visibility::Private, None).await;
    // "widget" is in every chunk, "zeppelin" in one
    let mut chunks = Vec::new();
    for i in 0..300 {
        let text = if i == 7 {
            "widget zeppelin".to_owned()
        } else {
            format!("widget number{i}")
        };
        chunks.push(task_chunk(org, p, &text));
    }
    fx::insert(&mut c, &chunks).await;
    let conv = store::conversations::create(&mut c, org, user, "c", None)
        .await
        .unwrap()
        .id;
    let search = |text: &'static str, stopword_min_rows: u32| {
        let pool = db.pool.clone();
        async move {
            let mut c = pool.acquire().await.unwrap();
            let q = Query {
                org_id: org.into(),
                user_id: user.into(),
                conversation_id: conv.into(),
                embedding: None,
                text,
                model: MODEL,
                dim: DIM as u32,
                k: 6,
                exclude_message_ids: &[],
            };
            let tuning = Tuning {
                stopword_min_rows,
                ..Tuning::default()
            };
            let got = retrieval::search(&mut c, &q, &tuning).await.unwrap();
            got.into_iter().map(|c| c.content).collect::<Vec<_>>()
        }
    };
    // before statistics exist nothing is left out: every chunk matches "widget"
    let got = search("widget zeppelin", 100).await;
    assert_eq!(got.len(), 6, "{got:?}");
    assert_eq!(got[0], "widget zeppelin");
    sqlx::query("ANALYZE embeddings")
        .execute(&mut *c)
        .await
        .unwrap();
    // with them, "widget" (in all 300 chunks, more than 100) is a corpus stopword: only the
    // rare term's chunk matches
    assert_eq!(
        search("widget zeppelin", 100).await,
        vec!["widget zeppelin"]
    );
    // a question of common terms only finds nothing by full text (and raises no error)
    let got = search("widget", 100).await;
    assert!(got.is_empty(), "{got:?}");
    // a small corpus keeps every term: 300 chunks are under the default floor (10 000), and
    // 0 turns the filter off
    assert_eq!(search("widget", 10_000).await.len(), 6);
    assert_eq!(search("widget", 0).await.len(), 6);
}

/// A quoted phrase ranks the chunk holding it, words in order, above one that holds its words
/// more often but apart; without the quotes, term frequency decides.
#[tokio::test]
async fn a_quoted_phrase_ranks_the_chunk_holding_it_first() {
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let org = fx::org(&mut c).await;
    let user = fx::user(&mut c, org, Role::Owner).await;
    let p = fx::project(&mut c, org, user, Visibility::Private, None).await;
    let apart =
        "code review notes: launch moved to May; code freeze before every launch date; code owners";
    let phrase = "the launch code is kept by the captain";
    let chunks: Vec<_> = [apart, phrase]
        .iter()
        .map(|text| task_chunk(org, p, text))
        .collect();
    fx::insert(&mut c, &chunks).await;
    let conv = store::conversations::create(&mut c, org, user, "c", None)
        .await
        .unwrap()
        .id;
    // full text only (no embedding)
    let search = |text: &'static str| {
        let db = &db;
        async move {
            let got = search_as(db, org, user, conv, text, None).await;
            got.into_iter().map(|c| c.content).collect::<Vec<_>>()
        }
    };
    assert_eq!(search("where is the launch code").await, [apart, phrase]);
    assert_eq!(
        search("where is the \"launch code\"").await,
        [phrase, apart]
    );
    assert_eq!(
        search("where is the \u{201c}launch code\u{201d}").await,
        [phrase, apart],
        "curly quotes too"
    );
    // a one-word or stopword-only "phrase" changes nothing, and raises no error
    assert_eq!(
        search("where is the \"launch\" code").await,
        [apart, phrase]
    );
    assert_eq!(search("\"the\" launch code").await, [apart, phrase]);
}

#[tokio::test]
async fn a_message_chunk_is_found_only_while_what_it_drew_on_is_visible() {
    use store::provenance::Provenance;
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let org = fx::org(&mut c).await;
    let alice = fx::user(&mut c, org, Role::Member).await;
    let bob = fx::user(&mut c, org, Role::Member).await;
    let open = fx::project(&mut c, org, alice, Visibility::Org, None).await;
    let private = fx::project(&mut c, org, bob, Visibility::Private, None).await;
    store::projects::add_member(&mut c, org.into(), private.into(), alice.into())
        .await
        .unwrap();
    let doc = fx::document(&mut c, org, open, "Plan").await;
    let chunk = |text: &str, p: Provenance| {
        let mut ch = fx::message_chunk(org, alice, Uuid::now_v7(), text, MODEL, DIM);
        ch.provenance = p;
        ch
    };
    fx::insert(
        &mut c,
        &[
            chunk("zebra from nothing", Provenance::default()),
            chunk(
                "zebra from the private project",
                Provenance {
                    source_project_ids: vec![private.into()],
                    ..Default::default()
                },
            ),
            chunk(
                "zebra from the plan",
                Provenance {
                    source_project_ids: vec![open.into()],
                    source_document_ids: vec![doc.into()],
                    narrow: false,
                },
            ),
        ],
    )
    .await;
    let conv = store::conversations::create(&mut c, org, alice, "c", None)
        .await
        .unwrap()
        .id;
    let narrowed = store::conversations::create(&mut c, org, alice, "n", Some(&[open]))
        .await
        .unwrap()
        .id;
    let found = |chunks: Vec<Chunk>| {
        let mut v: Vec<String> = chunks.into_iter().map(|c| c.content).collect();
        v.sort();
        v
    };
    let all = found(search_as(&db, org, alice, conv, "zebra", Some("zebra")).await);
    assert_eq!(
        all,
        [
            "zebra from nothing",
            "zebra from the plan",
            "zebra from the private project"
        ]
    );
    // the conversation's narrowing applies to what a chunk drew on
    let n = found(search_as(&db, org, alice, narrowed, "zebra", Some("zebra")).await);
    assert_eq!(n, ["zebra from nothing", "zebra from the plan"]);
    // the document restricted to someone else since: what drew on it is hidden
    sqlx::query("UPDATE documents SET visible_to_user_ids = $2 WHERE id = $1")
        .bind(doc)
        .bind(vec![bob])
        .execute(&mut *c)
        .await
        .unwrap();
    // removed from the private project
    store::projects::remove_member(&mut c, private.into(), alice.into())
        .await
        .unwrap();
    let left = found(search_as(&db, org, alice, conv, "zebra", Some("zebra")).await);
    assert_eq!(left, ["zebra from nothing"]);
}
