//! A randomized model test of visibility: random orgs, users, roles, teams, projects of every
//! visibility, project members and tasks (set up through `store` for speed), then, for every
//! user, what the HTTP API shows (`GET /v1/projects`, `GET /v1/projects/{id}`, task lists and
//! task reads) is compared with a reference computed in plain Rust. Memberships are then
//! mutated (team removals, project-member removals, demotions and promotions, org removals)
//! and everything is compared again.

use std::collections::{BTreeSet, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::json;
use store::{Role, TaskStatus, Visibility};
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app};

/// Not a real hash: these users never log in (tokens are minted directly).
const NO_PASSWORD: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$not-a-real-hash";

struct UserM {
    id: Uuid,
    org: Uuid,
    role: Role,
    token: String,
    /// still a member of the org
    active: bool,
}

struct ProjectM {
    id: Uuid,
    org: Uuid,
    visibility: Visibility,
    team: Option<Uuid>,
    members: HashSet<Uuid>,
}

struct TaskM {
    id: Uuid,
    project: Uuid,
}

#[derive(Default)]
struct World {
    users: Vec<UserM>,
    teams: Vec<(Uuid, Uuid)>,
    team_members: HashSet<(Uuid, Uuid)>,
    projects: Vec<ProjectM>,
    tasks: Vec<TaskM>,
}

impl World {
    /// The reference rule, in plain Rust.
    fn sees(&self, u: &UserM, p: &ProjectM) -> bool {
        if !u.active || u.org != p.org {
            return false;
        }
        if matches!(u.role, Role::Owner | Role::Admin) {
            return true;
        }
        match p.visibility {
            Visibility::Org => true,
            Visibility::Team => p
                .team
                .is_some_and(|t| self.team_members.contains(&(t, u.id))),
            Visibility::Private => p.members.contains(&u.id),
        }
    }
}

fn token(user: Uuid, org: Uuid) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": user, "org": org, "iat": now, "exp": now + 3600,
                "iss": "switchboard", "aud": "switchboard-api"}),
        &EncodingKey::from_secret(testkit::TEST_JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

async fn build(app: &TestApp, rng: &mut StdRng, seed: u64) -> World {
    let mut w = World::default();
    let mut conn = app.db.pool.acquire().await.unwrap();
    let conn = &mut *conn;
    for o in 0..rng.random_range(2..=3) {
        let org = store::tenancy::insert_org(conn, &format!("org{seed}-{o}"))
            .await
            .unwrap();
        let first = w.users.len();
        for u in 0..rng.random_range(3..=6) {
            let role = if u == 0 {
                Role::Owner
            } else {
                *[Role::Admin, Role::Member, Role::Member, Role::Member]
                    .choose(rng)
                    .unwrap()
            };
            let user = store::tenancy::insert_user(
                conn,
                &format!("u{seed}-{o}-{u}-{}@example.com", Uuid::new_v4().simple()),
                "U",
                NO_PASSWORD,
            )
            .await
            .unwrap();
            store::tenancy::insert_membership(conn, org.id, user.id, role)
                .await
                .unwrap();
            w.users.push(UserM {
                id: user.id.into(),
                org: org.id.into(),
                role,
                token: token(user.id.into(), org.id.into()),
                active: true,
            });
        }
        let members: Vec<Uuid> = w.users[first..].iter().map(|u| u.id).collect();
        let mut org_teams = Vec::new();
        for t in 0..rng.random_range(1..=3) {
            let team = store::tenancy::insert_team(conn, org.id, &format!("team{t}"))
                .await
                .unwrap();
            org_teams.push(team.id);
            w.teams.push((team.id.into(), org.id.into()));
            for m in &members {
                if rng.random_bool(0.4) {
                    store::tenancy::add_team_member(&app.db.pool, org.id, team.id, (*m).into())
                        .await
                        .unwrap();
                    w.team_members.insert((team.id.into(), *m));
                }
            }
        }
        for p in 0..rng.random_range(3..=7) {
            let visibility = *Visibility::ALL.choose(rng).unwrap();
            let team_id = (visibility == Visibility::Team).then(|| *org_teams.choose(rng).unwrap());
            let creator = *members.choose(rng).unwrap();
            let project = store::projects::insert_project(
                conn,
                &store::projects::NewProject {
                    org_id: org.id,
                    created_by: creator.into(),
                    name: &format!("p{p}"),
                    description: "",
                    visibility,
                    team_id,
                },
            )
            .await
            .unwrap();
            let mut pm = HashSet::new();
            if visibility == Visibility::Private {
                pm.insert(creator);
                for m in &members {
                    if *m != creator && rng.random_bool(0.3) {
                        store::projects::add_member(conn, org.id, project.id, (*m).into())
                            .await
                            .unwrap();
                        pm.insert(*m);
                    }
                }
            }
            for t in 0..rng.random_range(0..=2) {
                let task = store::tasks::insert_task(
                    conn,
                    &store::tasks::NewTask {
                        org_id: org.id,
                        project_id: project.id,
                        created_by: creator.into(),
                        title: &format!("t{t}"),
                        description: "",
                        status: TaskStatus::Todo,
                        assignee_id: None,
                    },
                )
                .await
                .unwrap();
                w.tasks.push(TaskM {
                    id: task.id.into(),
                    project: project.id.into(),
                });
            }
            w.projects.push(ProjectM {
                id: project.id.into(),
                org: org.id.into(),
                visibility,
                team: team_id.map(Into::into),
                members: pm,
            });
        }
    }
    w
}

/// Compare every user's view over HTTP with the reference. Returns the number of checks.
async fn compare(app: &TestApp, w: &World, label: &str) -> usize {
    let mut checks = 0;
    for u in &w.users {
        let list = app.get("/v1/projects?limit=200", &u.token).await;
        if !u.active {
            assert_eq!(
                list.status, 401,
                "{label}: removed user still authenticated"
            );
            checks += 1;
            continue;
        }
        assert_eq!(list.status, 200, "{label}: {}", list.body);
        let got: BTreeSet<String> = list.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect();
        let want: BTreeSet<String> = w
            .projects
            .iter()
            .filter(|p| w.sees(u, p))
            .map(|p| p.id.to_string())
            .collect();
        assert_eq!(
            got, want,
            "{label}: project list of user {} ({:?})",
            u.id, u.role
        );
        checks += 1;
        for p in &w.projects {
            let sees = w.sees(u, p);
            let expect = if sees { 200 } else { 404 };
            let r = app.get(&format!("/v1/projects/{}", p.id), &u.token).await;
            assert_eq!(
                r.status, expect,
                "{label}: GET project {:?} {} by {:?} user {}",
                p.visibility, p.id, u.role, u.id
            );
            let r = app
                .get(&format!("/v1/projects/{}/tasks", p.id), &u.token)
                .await;
            assert_eq!(r.status, expect, "{label}: task list of {}", p.id);
            if sees {
                let got: BTreeSet<String> = r.body["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["id"].as_str().unwrap().to_owned())
                    .collect();
                let want: BTreeSet<String> = w
                    .tasks
                    .iter()
                    .filter(|t| t.project == p.id)
                    .map(|t| t.id.to_string())
                    .collect();
                assert_eq!(got, want, "{label}: tasks of {}", p.id);
            }
            checks += 2;
        }
        for t in &w.tasks {
            let p = w.projects.iter().find(|p| p.id == t.project).unwrap();
            let expect = if w.sees(u, p) { 200 } else { 404 };
            let r = app.get(&format!("/v1/tasks/{}", t.id), &u.token).await;
            assert_eq!(r.status, expect, "{label}: GET task {} by {}", t.id, u.id);
            // writes follow the same rule (the status stays `todo`: nothing really changes)
            let r = app
                .patch(
                    &format!("/v1/tasks/{}", t.id),
                    &u.token,
                    json!({"status": "todo"}),
                )
                .await;
            assert_eq!(r.status, expect, "{label}: PATCH task {} by {}", t.id, u.id);
            checks += 2;
        }
    }
    checks
}

/// Change memberships: through HTTP where an endpoint exists (by the org's owner), directly
/// otherwise; the reference follows.
async fn mutate(app: &TestApp, w: &mut World, rng: &mut StdRng) {
    let owner_token = |w: &World, org: Uuid| {
        w.users
            .iter()
            .find(|u| u.org == org && u.role == Role::Owner && u.active)
            .map(|u| u.token.clone())
            .unwrap()
    };
    // remove some team memberships
    let mut tm: Vec<(Uuid, Uuid)> = w.team_members.iter().copied().collect();
    tm.sort();
    tm.shuffle(rng);
    for (team, user) in tm.into_iter().take(4) {
        let org = w.teams.iter().find(|t| t.0 == team).unwrap().1;
        let r = app
            .delete(
                &format!("/v1/teams/{team}/members/{user}"),
                &owner_token(w, org),
            )
            .await;
        assert_eq!(r.status, 204, "{}", r.body);
        w.team_members.remove(&(team, user));
    }
    // remove some private-project members
    let mut pms: Vec<(usize, Uuid)> = w
        .projects
        .iter()
        .enumerate()
        .flat_map(|(i, p)| p.members.iter().map(move |m| (i, *m)))
        .collect();
    pms.sort();
    pms.shuffle(rng);
    for (i, user) in pms.into_iter().take(4) {
        let (pid, org) = (w.projects[i].id, w.projects[i].org);
        let r = app
            .delete(
                &format!("/v1/projects/{pid}/members/{user}"),
                &owner_token(w, org),
            )
            .await;
        assert_eq!(r.status, 204, "{}", r.body);
        w.projects[i].members.remove(&user);
    }
    // demote admins, promote a member
    for i in 0..w.users.len() {
        let u = &w.users[i];
        let new_role = match u.role {
            Role::Admin if rng.random_bool(0.7) => Role::Member,
            Role::Member if rng.random_bool(0.15) => Role::Admin,
            _ => continue,
        };
        let (org, id) = (u.org, u.id);
        let r = app
            .patch(
                &format!("/v1/orgs/{org}/members/{id}"),
                &owner_token(w, org),
                json!({"role": new_role.as_str()}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        w.users[i].role = new_role;
    }
    // remove one non-owner from their org (cascades to teams and projects)
    let candidates: Vec<usize> = (0..w.users.len())
        .filter(|&i| w.users[i].role != Role::Owner && w.users[i].active)
        .collect();
    if let Some(&i) = candidates.choose(rng) {
        let (org, id) = (w.users[i].org, w.users[i].id);
        assert!(
            store::tenancy::remove_member(&app.db.pool, org.into(), id.into())
                .await
                .unwrap()
        );
        w.users[i].active = false;
        w.team_members.retain(|(_, u)| *u != id);
        for p in &mut w.projects {
            p.members.remove(&id);
        }
    }
}

#[tokio::test]
async fn visibility_matches_the_reference_model() {
    let app = spawn_app().await;
    let mut total = 0;
    for seed in [7_u64, 42, 2026, 1, 99, 123_456] {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut w = build(&app, &mut rng, seed).await;
        // each world has several orgs, so cross-org reads are compared too
        total += compare(&app, &w, &format!("seed {seed} initial")).await;
        mutate(&app, &mut w, &mut rng).await;
        total += compare(&app, &w, &format!("seed {seed} mutated")).await;
    }
    assert!(total > 1000, "only {total} checks");
}
