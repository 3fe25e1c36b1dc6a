//! The schema keeps tenants apart by itself (composite foreign keys), constraint violations
//! become domain errors, and `visible_projects` follows live memberships.

use sqlx::PgConnection;
use store::projects::NewProject;
use store::tasks::{NewTask, TaskPatch};
use store::tenancy::{Org, User};
use store::{ProjectId, Role, StoreError, TaskStatus, UserId, Visibility};
use testkit::TestDb;
use uuid::Uuid;

async fn org_with(conn: &mut PgConnection, name: &str, users: &[Role]) -> (Org, Vec<User>) {
    let org = store::tenancy::insert_org(conn, name).await.unwrap();
    let mut out = Vec::new();
    for (i, role) in users.iter().enumerate() {
        let u = store::tenancy::insert_user(
            conn,
            &format!("{name}-{i}-{}@example.com", Uuid::new_v4().simple()),
            "U",
            "x",
        )
        .await
        .unwrap();
        store::tenancy::insert_membership(conn, org.id, u.id, *role)
            .await
            .unwrap();
        out.push(u);
    }
    (org, out)
}

async fn visible(conn: &mut PgConnection, user: UserId) -> Vec<ProjectId> {
    let mut v: Vec<ProjectId> = sqlx::query_scalar("SELECT project_id FROM visible_projects($1)")
        .bind(user)
        .fetch_all(conn)
        .await
        .unwrap();
    v.sort();
    v
}

fn new_project(
    org: Uuid,
    by: Uuid,
    visibility: Visibility,
    team: Option<Uuid>,
) -> NewProject<'static> {
    NewProject {
        org_id: org.into(),
        created_by: by.into(),
        name: "p",
        description: "",
        visibility,
        team_id: team.map(Into::into),
    }
}

#[tokio::test]
async fn cross_org_rows_are_refused_by_the_schema() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let (a, au) = org_with(&mut conn, "a", &[Role::Owner]).await;
    let (b, bu) = org_with(&mut conn, "b", &[Role::Owner]).await;
    let team_a = store::tenancy::insert_team(&mut conn, a.id, "core")
        .await
        .unwrap();

    // B's user into A's team
    let e = store::tenancy::add_team_member(&db.pool, a.id, team_a.id, bu[0].id)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::InvalidReference {
                field: "user_id",
                ..
            }
        ),
        "{e:?}"
    );
    // A's team named by a project of B
    let e = store::projects::insert_project(
        &mut conn,
        &new_project(
            b.id.into(),
            bu[0].id.into(),
            Visibility::Team,
            Some(team_a.id.into()),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::InvalidReference {
                field: "team_id",
                ..
            }
        ),
        "{e:?}"
    );
    // a team project without a team
    let e = store::projects::insert_project(
        &mut conn,
        &new_project(a.id.into(), au[0].id.into(), Visibility::Team, None),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, StoreError::InvalidReference { .. }), "{e:?}");
    // B's user as a member of A's private project
    let p = store::projects::insert_project(
        &mut conn,
        &new_project(a.id.into(), au[0].id.into(), Visibility::Private, None),
    )
    .await
    .unwrap();
    let e = store::projects::add_member(&mut conn, a.id, p.id, bu[0].id)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::InvalidReference { .. }), "{e:?}");
    // the creator is already its member
    let e = store::projects::add_member(&mut conn, a.id, p.id, au[0].id)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
    // B's user as assignee of A's task
    let e = store::tasks::insert_task(
        &mut conn,
        &NewTask {
            org_id: a.id,
            project_id: p.id,
            created_by: au[0].id,
            title: "t",
            description: "",
            status: TaskStatus::Todo,
            assignee_id: Some(bu[0].id),
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::InvalidReference {
                field: "assignee_id",
                ..
            }
        ),
        "{e:?}"
    );
    // a task filed under the wrong org for its project
    let r =
        sqlx::query("INSERT INTO tasks (id, org_id, project_id, title) VALUES ($1, $2, $3, 'x')")
            .bind(Uuid::now_v7())
            .bind(b.id)
            .bind(p.id)
            .execute(&mut *conn)
            .await;
    assert!(r.is_err());
}

#[tokio::test]
async fn emails_are_unique_case_insensitively_and_users_have_one_org() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let (a, au) = org_with(&mut conn, "a", &[Role::Owner]).await;
    let (b, _) = org_with(&mut conn, "b", &[Role::Owner]).await;
    let e = store::tenancy::insert_user(&mut conn, &au[0].email.to_uppercase(), "X", "x")
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
    let e = store::tenancy::insert_membership(&mut conn, b.id, au[0].id, Role::Member)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
    let found = store::tenancy::find_login(&db.pool, &au[0].email.to_uppercase())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((found.user_id, found.org_id), (au[0].id, a.id));
}

#[tokio::test]
async fn visible_projects_follows_live_memberships() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let (org, u) = org_with(
        &mut conn,
        "o",
        &[Role::Owner, Role::Admin, Role::Member, Role::Member],
    )
    .await;
    let (owner, admin, m1, m2) = (u[0].id, u[1].id, u[2].id, u[3].id);
    let (_, other) = org_with(&mut conn, "x", &[Role::Owner]).await;
    let team = store::tenancy::insert_team(&mut conn, org.id, "t")
        .await
        .unwrap();
    store::tenancy::add_team_member(&db.pool, org.id, team.id, m1)
        .await
        .unwrap();
    let p_org = store::projects::insert_project(
        &mut conn,
        &new_project(org.id.into(), m2.into(), Visibility::Org, None),
    )
    .await
    .unwrap()
    .id;
    let p_team = store::projects::insert_project(
        &mut conn,
        &new_project(
            org.id.into(),
            m1.into(),
            Visibility::Team,
            Some(team.id.into()),
        ),
    )
    .await
    .unwrap()
    .id;
    let p_priv = store::projects::insert_project(
        &mut conn,
        &new_project(org.id.into(), m2.into(), Visibility::Private, None),
    )
    .await
    .unwrap()
    .id;
    let mut all = vec![p_org, p_team, p_priv];
    all.sort();
    let sorted = |mut v: Vec<ProjectId>| {
        v.sort();
        v
    };
    assert_eq!(visible(&mut conn, owner).await, all);
    assert_eq!(visible(&mut conn, admin).await, all);
    assert_eq!(visible(&mut conn, m1).await, sorted(vec![p_org, p_team]));
    assert_eq!(visible(&mut conn, m2).await, sorted(vec![p_org, p_priv]));
    assert_eq!(
        visible(&mut conn, other[0].id).await,
        Vec::<ProjectId>::new()
    );

    // a task in the team project assigned to m1; m1 leaves the team → loses it at once
    let task = store::tasks::insert_task(
        &mut conn,
        &NewTask {
            org_id: org.id,
            project_id: p_team,
            created_by: m1,
            title: "t",
            description: "",
            status: TaskStatus::Todo,
            assignee_id: Some(m1),
        },
    )
    .await
    .unwrap();
    assert!(
        store::tenancy::remove_team_member(&db.pool, org.id, team.id, m1)
            .await
            .unwrap()
    );
    assert_eq!(visible(&mut conn, m1).await, vec![p_org]);
    assert!(
        store::tasks::get_visible(&mut conn, m1, task.id, false)
            .await
            .unwrap()
            .is_none()
    );
    // the admin is demoted: only org projects remain
    store::tenancy::set_role(&db.pool, org.id, admin, Role::Member)
        .await
        .unwrap();
    assert_eq!(visible(&mut conn, admin).await, vec![p_org]);
    // m1 is removed from the org: sees nothing, and their task is unassigned
    assert!(
        store::tenancy::remove_member(&db.pool, org.id, m1)
            .await
            .unwrap()
    );
    assert_eq!(visible(&mut conn, m1).await, Vec::<ProjectId>::new());
    let t = store::tasks::get_visible(&mut conn, owner, task.id, false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.assignee_id, None);
    // updates go through visibility too
    let patch = TaskPatch {
        title: Some("renamed".into()),
        ..TaskPatch::default()
    };
    assert!(
        store::tasks::update_visible(&mut conn, m2, task.id, &patch)
            .await
            .unwrap()
            .is_none()
    );
    let t = store::tasks::update_visible(&mut conn, owner, task.id, &patch)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.title, "renamed");
}
