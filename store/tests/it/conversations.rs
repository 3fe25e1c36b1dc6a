//! Conversations: owner-only reads, live narrowing to visible projects, and an idempotent
//! completion (one answer per response, whatever the redeliveries).

use store::conversations::{self, Answer, Completion, NewTurn, TurnStarted};
use store::projects::NewProject;
use store::responses;
use store::{ErrorCode, ResponseStatus, Role, StoreError, Visibility};
use testkit::TestDb;
use uuid::Uuid;

struct World {
    db: TestDb,
    org: Uuid,
    alice: Uuid,
    bob: Uuid,
    private_p: Uuid,
    open_p: Uuid,
}

async fn world() -> World {
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let org = store::tenancy::insert_org(&mut c, "o").await.unwrap();
    let mut users = Vec::new();
    for (i, role) in [Role::Member, Role::Member].iter().enumerate() {
        let u = store::tenancy::insert_user(
            &mut c,
            &format!("u{i}-{}@x.io", Uuid::new_v4().simple()),
            "U",
            "x",
        )
        .await
        .unwrap();
        store::tenancy::insert_membership(&mut c, org.id, u.id, *role)
            .await
            .unwrap();
        users.push(u.id);
    }
    let private_p = store::projects::insert_project(
        &mut c,
        &NewProject {
            org_id: org.id,
            created_by: users[0],
            name: "secret",
            description: "",
            visibility: Visibility::Private,
            team_id: None,
        },
    )
    .await
    .unwrap()
    .id;
    let open_p = store::projects::insert_project(
        &mut c,
        &NewProject {
            org_id: org.id,
            created_by: users[0],
            name: "open",
            description: "",
            visibility: Visibility::Org,
            team_id: None,
        },
    )
    .await
    .unwrap()
    .id;
    drop(c);
    World {
        db,
        org: org.id.into(),
        alice: users[0].into(),
        bob: users[1].into(),
        private_p: private_p.into(),
        open_p: open_p.into(),
    }
}

#[tokio::test]
async fn only_the_owner_reads_a_conversation() {
    let w = world().await;
    let mut c = w.db.pool.acquire().await.unwrap();
    let conv = conversations::create(&mut c, w.org, w.alice, "t", None)
        .await
        .unwrap();
    assert!(
        conversations::get_own(&mut c, w.alice, conv.id)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        conversations::get_own(&mut c, w.bob, conv.id)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        conversations::list_own(&w.db.pool, w.bob, None, 10)
            .await
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        conversations::list_own(&w.db.pool, w.alice, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn narrowing_accepts_only_visible_projects_and_follows_live_membership() {
    let w = world().await;
    let mut c = w.db.pool.acquire().await.unwrap();
    // bob cannot see alice's private project: refused, nothing written
    let err = conversations::create(&mut c, w.org, w.bob, "t", Some(&[w.private_p]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::InvalidReference {
                field: "project_ids",
                ..
            }
        ),
        "{err:?}"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    assert_eq!(n, 0);

    let all = conversations::create(&mut c, w.org, w.alice, "all", None)
        .await
        .unwrap();
    let narrow = conversations::create(&mut c, w.org, w.alice, "n", Some(&[w.private_p]))
        .await
        .unwrap();
    let mut both = vec![w.private_p, w.open_p];
    both.sort();
    assert_eq!(
        conversations::usable_projects(&mut c, w.alice, all.id)
            .await
            .unwrap(),
        both
    );
    assert_eq!(
        conversations::usable_projects(&mut c, w.alice, narrow.id)
            .await
            .unwrap(),
        vec![w.private_p]
    );
    assert_eq!(
        conversations::scope(&mut c, narrow.id).await.unwrap(),
        vec![w.private_p]
    );
    // another user asking about alice's conversation gets nothing
    assert!(
        conversations::usable_projects(&mut c, w.bob, all.id)
            .await
            .unwrap()
            .is_empty()
    );

    // alice loses the private project: it is gone from both at once
    store::projects::remove_member(&mut c, w.private_p.into(), w.alice.into())
        .await
        .unwrap();
    assert_eq!(
        conversations::usable_projects(&mut c, w.alice, all.id)
            .await
            .unwrap(),
        vec![w.open_p]
    );
    assert!(
        conversations::usable_projects(&mut c, w.alice, narrow.id)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn recent_messages_are_the_last_n_in_order() {
    let w = world().await;
    let mut c = w.db.pool.acquire().await.unwrap();
    let conv = conversations::create(&mut c, w.org, w.alice, "t", None)
        .await
        .unwrap();
    let mut last = None;
    for i in 0..10 {
        let (m, _) = testkit::turns::start(&mut c, conv.id, &format!("m{i}")).await;
        last = Some(m.id);
    }
    let recent = conversations::recent_messages(&mut c, conv.id, last.unwrap(), 4)
        .await
        .unwrap();
    let texts: Vec<&str> = recent.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(texts, vec!["m6", "m7", "m8", "m9"]);
}

/// `start_own_turn` with fresh ids and no idempotency key.
async fn own_turn(
    c: &mut sqlx::PgConnection,
    user: Uuid,
    conversation: Uuid,
    content: &str,
) -> Option<TurnStarted> {
    let turn = NewTurn {
        user_id: user,
        conversation_id: conversation,
        content,
        message_id: Uuid::now_v7(),
        response_id: Uuid::now_v7(),
        job_id: Uuid::now_v7(),
        key: None,
    };
    conversations::start_own_turn(c, &turn).await.unwrap()
}

/// Take `response` for job `job` (a lease of 30 s).
async fn take(
    c: &mut sqlx::PgConnection,
    w: &World,
    conv: Uuid,
    response: Uuid,
    job: Uuid,
) -> (responses::Take, responses::TurnStart) {
    let start = responses::take(
        c,
        &responses::JobTurn {
            job_id: job.into(),
            user_id: w.alice.into(),
            org_id: w.org.into(),
            conversation_id: conv.into(),
            response_id: response.into(),
        },
        "m",
        std::time::Duration::from_secs(30),
    )
    .await
    .unwrap()
    .unwrap();
    (start.take(job.into()), start)
}

#[tokio::test]
async fn a_response_moves_from_queued_to_running_to_completed_and_fences_its_runs() {
    let w = world().await;
    let mut c = w.db.pool.acquire().await.unwrap();
    let conv = conversations::create(&mut c, w.org, w.alice, "t", None)
        .await
        .unwrap();
    let job = Uuid::now_v7();
    let turn = NewTurn {
        user_id: w.alice,
        conversation_id: conv.id,
        content: "hi",
        message_id: Uuid::now_v7(),
        response_id: Uuid::now_v7(),
        job_id: job,
        key: None,
    };
    let Some(TurnStarted::New(response)) =
        conversations::start_own_turn(&mut c, &turn).await.unwrap()
    else {
        panic!("a new turn");
    };
    assert_eq!(
        (response.status, response.run, response.job_id),
        (ResponseStatus::Queued, 0, Some(job))
    );
    // another job than the response's is stale; the response's own takes run 1
    let (stale, _) = take(&mut c, &w, conv.id, response.id, Uuid::now_v7()).await;
    assert_eq!(stale, responses::Take::Stale);
    let (taken, start) = take(&mut c, &w, conv.id, response.id, job).await;
    assert_eq!(taken, responses::Take::Taken { run: 1 });
    assert_eq!(
        start.response.status,
        ResponseStatus::Queued,
        "as read before the take"
    );
    // a duplicate of the job while run 1 lives: held, for about the lease
    let (held, _) = take(&mut c, &w, conv.id, response.id, job).await;
    let responses::Take::Held { for_ } = held else {
        panic!("{held:?}");
    };
    assert!(for_ > std::time::Duration::from_secs(20), "{for_:?}");
    assert_eq!(
        responses::mark_streaming(&mut c, response.id.into(), 1)
            .await
            .unwrap(),
        Some(0)
    );
    // run 1's lease expires (its worker died): run 2 takes over and is told of the restart
    sqlx::query("UPDATE responses SET leased_until = now() - interval '1 second' WHERE id = $1")
        .bind(response.id)
        .execute(&mut *c)
        .await
        .unwrap();
    let (taken, _) = take(&mut c, &w, conv.id, response.id, job).await;
    assert_eq!(taken, responses::Take::Taken { run: 2 });
    assert_eq!(
        responses::mark_streaming(&mut c, response.id.into(), 2)
            .await
            .unwrap(),
        Some(1),
        "a restart is counted"
    );
    // run 1 is superseded: none of its writes land
    assert_eq!(
        responses::mark_streaming(&mut c, response.id.into(), 1)
            .await
            .unwrap(),
        None
    );
    assert!(
        responses::renew(
            &w.db.pool,
            &[(response.id.into(), 1)],
            std::time::Duration::from_secs(5)
        )
        .await
        .unwrap()
        .is_empty()
    );
    assert!(
        !responses::release(&mut c, response.id.into(), 1, false)
            .await
            .unwrap()
    );
    assert!(
        !responses::fail_run(&mut c, response.id.into(), 1, ErrorCode::InternalError, "y")
            .await
            .unwrap()
    );
    let answer = |text: &'static str| Answer {
        content: text,
        model: "m1",
        prompt_tokens: Some(3),
        completion_tokens: Some(2),
        latency_ms: 5,
        citations: serde_json::json!([]),
        sources: Default::default(),
    };
    assert!(matches!(
        conversations::complete(&mut c, response.id, 1, &answer("stale"))
            .await
            .unwrap(),
        Completion::NotHeld
    ));
    assert_eq!(
        responses::renew(
            &w.db.pool,
            &[(response.id.into(), 2)],
            std::time::Duration::from_secs(5)
        )
        .await
        .unwrap(),
        vec![response.id.into()]
    );
    let Completion::Done {
        message: first,
        stored,
    } = conversations::complete(&mut c, response.id, 2, &answer("first"))
        .await
        .unwrap()
    else {
        panic!("run 2 holds it");
    };
    assert!(stored, "the first call stores the answer");
    let Completion::Done {
        message: second,
        stored,
    } = conversations::complete(&mut c, response.id, 2, &answer("second"))
        .await
        .unwrap()
    else {
        panic!("completed: the stored answer comes back");
    };
    assert!(!stored, "a second call stores nothing");
    assert_eq!(first.id, second.id);
    assert_eq!(second.content, "first");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE role = 'assistant'")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let r = conversations::get_response_own(&mut c, w.alice, conv.id, response.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r.status, r.starts), (ResponseStatus::Completed, 2));
    assert_eq!(r.model.as_deref(), Some("m1"));
    // finished: failing changes nothing, nothing takes it
    assert!(
        !responses::fail_unfinished(
            &mut c,
            response.id.into(),
            None,
            ErrorCode::InternalError,
            "y"
        )
        .await
        .unwrap()
    );
    let (finished, _) = take(&mut c, &w, conv.id, response.id, job).await;
    assert_eq!(finished, responses::Take::Finished);
    assert!(
        conversations::get_response_own(&mut c, w.bob, conv.id, response.id)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn start_own_turn_writes_all_for_the_owner_and_nothing_for_anyone_else() {
    let w = world().await;
    let mut c = w.db.pool.acquire().await.unwrap();
    let conv = conversations::create(&mut c, w.org, w.alice, "t", None)
        .await
        .unwrap();
    let Some(TurnStarted::New(r)) = own_turn(&mut c, w.alice, conv.id, "hello").await else {
        panic!("alice's conversation");
    };
    let m = conversations::recent_messages(&mut c, conv.id, r.user_message_id, 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!((m.role.as_str(), m.content.as_str()), ("user", "hello"));
    assert_eq!(m.conversation_id, conv.id);
    assert_eq!((r.user_message_id, r.conversation_id), (m.id, conv.id));
    assert_eq!((r.status, r.starts), (ResponseStatus::Queued, 0));
    // what was returned is what is stored
    let stored = conversations::get_response_own(&mut c, w.alice, conv.id, r.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stored.id, stored.user_message_id), (r.id, m.id));
    assert_eq!(stored.created_at, r.created_at);
    let recent = conversations::recent_messages(&mut c, conv.id, m.id, 5)
        .await
        .unwrap();
    assert_eq!(recent.last().map(|x| (x.id, x.seq)), Some((m.id, m.seq)));
    let updated = conversations::get_own(&mut c, w.alice, conv.id)
        .await
        .unwrap()
        .unwrap()
        .updated_at;
    assert!(updated >= conv.updated_at);

    // bob (same org) and a missing id: nothing written
    let count = |table: &'static str| {
        let pool = w.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {table}"
            )))
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (msgs, resps) = (count("messages").await, count("responses").await);
    assert!(own_turn(&mut c, w.bob, conv.id, "sneaky").await.is_none());
    assert!(
        own_turn(&mut c, w.alice, uuid::Uuid::now_v7(), "lost")
            .await
            .is_none()
    );
    assert_eq!(
        (count("messages").await, count("responses").await),
        (msgs, resps)
    );
}

#[tokio::test]
async fn an_answer_records_what_it_drew_on_including_its_tool_results_and_window() {
    use store::provenance::Provenance;
    let w = world().await;
    let mut c = w.db.pool.acquire().await.unwrap();
    let conv = conversations::create(&mut c, w.org, w.alice, "t", None)
        .await
        .unwrap();
    // an earlier answer that drew on a restricted document stays in the window
    let doc = testkit::retrieval::document(&mut c, w.org, w.private_p, "Plan").await;
    sqlx::query("UPDATE documents SET visible_to_user_ids = $2 WHERE id = $1")
        .bind(doc)
        .bind(vec![w.alice])
        .execute(&mut *c)
        .await
        .unwrap();
    let (_, earlier) = testkit::turns::start(&mut c, conv.id, "first").await;
    let (before, _) = testkit::turns::answer(
        &mut c,
        earlier.id,
        &Answer {
            content: "from the plan",
            model: "m",
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: 1,
            citations: serde_json::json!([]),
            sources: conversations::AnswerSources {
                provenance: Provenance {
                    source_project_ids: vec![w.private_p.into()],
                    source_document_ids: vec![doc.into()],
                    narrow: true,
                },
                given: serde_json::json!([{"kind": "chunk", "source_id": doc}]),
                context_message_ids: &[],
            },
        },
    )
    .await;
    // this turn: a tool round that read a task of the open project
    let (question, response) = testkit::turns::start(&mut c, conv.id, "and the tasks?").await;
    let calls = serde_json::json!([{"id": "call_1", "type": "function",
        "function": {"name": "get_task", "arguments": "{}"}}]);
    let task_result = serde_json::json!({"task": {"id": Uuid::now_v7(), "project_id": w.open_p}});
    store::actions::insert_round(
        &mut c,
        &store::actions::Round {
            conversation_id: conv.id.into(),
            response_id: response.id.into(),
            round: 1,
            content: "",
            model: "m",
            tool_calls: &calls,
            results: &[("call_1".to_owned(), task_result.to_string())],
        },
    )
    .await
    .unwrap();
    let window = [before.id, question.id];
    let (answer, _) = testkit::turns::answer(
        &mut c,
        response.id,
        &Answer {
            content: "done",
            model: "m",
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: 1,
            citations: serde_json::json!([]),
            sources: conversations::AnswerSources {
                context_message_ids: &window,
                ..Default::default()
            },
        },
    )
    .await;
    let mut projects = vec![w.private_p, w.open_p];
    projects.sort();
    let got = store::provenance::of_message(&mut c, answer.id.into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got,
        Provenance {
            source_project_ids: projects.into_iter().map(Into::into).collect(),
            source_document_ids: vec![doc.into()],
            narrow: true,
        }
    );
    let sources: serde_json::Value =
        sqlx::query_scalar("SELECT sources FROM messages WHERE id = $1")
            .bind(answer.id)
            .fetch_one(&mut *c)
            .await
            .unwrap();
    assert_eq!(
        sources,
        serde_json::json!([{"kind": "tool_result", "source_kind": "project", "id": w.open_p}])
    );
    // the user's own message drew on nothing
    assert_eq!(
        store::provenance::of_message(&mut c, question.id.into())
            .await
            .unwrap(),
        Some(Provenance::default())
    );
}
