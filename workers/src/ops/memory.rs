//! `worker memory list|add|delete`: the operators' path to conversation memory
//! (docs/ARCHITECTURE.md, "Memory" — users never see it; no HTTP endpoint reads it). Org-tier
//! entries are added this way. Here rather than in `api`, which never calls a model: `add`
//! embeds the entry through the model proxy.

use std::fmt::Write as _;

use store::memory::{self, Entry, Inserted, NewEntry, Owner, Tier};
use uuid::Uuid;

/// Parse a tier (`org`, `project`, `user`) for clap.
pub fn parse_tier(s: &str) -> Result<Tier, String> {
    s.parse()
        .map_err(|_| "expected one of org, project, user".to_owned())
}

/// The owner an `add` names: `--tier org`, `--tier project --project P`, `--tier user --user U`.
/// Errors name the flag.
pub fn owner(
    org: Uuid,
    tier: Tier,
    project: Option<Uuid>,
    user: Option<Uuid>,
) -> Result<Owner, String> {
    match (tier, project, user) {
        (Tier::Org, None, None) => Ok(Owner::org(org)),
        (Tier::Project, Some(p), None) => Ok(Owner::project(org, p)),
        (Tier::User, None, Some(u)) => Ok(Owner::user(org, u)),
        (Tier::Project, None, _) => Err("--tier project needs --project".into()),
        (Tier::User, _, None) => Err("--tier user needs --user".into()),
        (Tier::Org, _, _) => Err("--tier org takes neither --project nor --user".into()),
        (Tier::Project, Some(_), Some(_)) => Err("--tier project takes no --user".into()),
        (Tier::User, Some(_), Some(_)) => Err("--tier user takes no --project".into()),
    }
}

/// Check and store an entry; the content is embedded with `EMBEDDING_MODEL` when the proxy
/// answers (otherwise it is stored without a vector and ranked by recency). Returns what the
/// store did.
pub async fn add(
    settings: &config::Settings,
    pool: &sqlx::PgPool,
    owner: Owner,
    content: &str,
) -> anyhow::Result<Inserted> {
    let content = content.trim();
    if content.is_empty() || content.chars().count() > memory::MAX_CONTENT_CHARS {
        anyhow::bail!(
            "--content must be 1 to {} characters",
            memory::MAX_CONTENT_CHARS
        );
    }
    let mut conn = pool.acquire().await?;
    if store::tenancy::get_org(pool, owner.org_id.into())
        .await?
        .is_none()
    {
        anyhow::bail!("--org: no organization {}", owner.org_id);
    }
    if let Some(user) = owner.user_id
        && !memory::is_org_member(&mut conn, owner.org_id, user).await?
    {
        anyhow::bail!(
            "--user: {user} is not a member of organization {}",
            owner.org_id
        );
    }
    drop(conn);
    let embedding = match llm::LlmClient::new(&settings.litellm) {
        Ok(client) => match client
            .embed(&settings.embedding.model, &[content.to_owned()])
            .await
        {
            Ok(mut embedded) => {
                // the org's model call, like any other (its usage, its budget)
                let model = settings.embedding.model.as_str();
                crate::model::record_embedding(pool, owner.org_id, model, embedded.tokens).await;
                match embedded.vectors.len() {
                    1 => embedded.vectors.pop().map(|v| (model.to_owned(), v)),
                    _ => None,
                }
            }
            Err(e) => {
                tracing::warn!(
                    kind = e.kind(),
                    "cannot embed the entry; stored without a vector"
                );
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "no model proxy client; stored without a vector");
            None
        }
    };
    let mut tx = pool.begin().await?;
    let done = memory::insert(
        &mut tx,
        &NewEntry {
            owner,
            content: content.to_owned(),
            source_conversation_id: None,
            source_message_ids: Vec::new(),
            author_user_id: None,
            provenance: Default::default(),
            embedding,
        },
        settings.memory.capacity(owner.tier.as_str()),
        settings.memory.dedup_distance,
    )
    .await
    .map_err(|e| match e {
        store::StoreError::InvalidReference { field, message } => {
            anyhow::anyhow!("--{field}: {message}")
        }
        other => anyhow::Error::new(other),
    })?;
    tx.commit().await?;
    Ok(done)
}

/// The entries as a table: id, tier, owner (project or user id), updated, content (one line).
pub fn render(entries: &[Entry]) -> String {
    let mut out = String::from("id\ttier\towner\tupdated_at\tcontent\n");
    for e in entries {
        let owner = e
            .project_id
            .or(e.user_id)
            .map_or_else(|| e.org_id.to_string(), |id| id.to_string());
        let content: String = e
            .content
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}",
            e.id,
            e.tier,
            owner,
            e.updated_at.to_rfc3339(),
            content
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn owners_need_exactly_their_flag() {
        let (o, p, u) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(owner(o, Tier::Org, None, None).unwrap(), Owner::org(o));
        assert_eq!(
            owner(o, Tier::Project, Some(p), None).unwrap(),
            Owner::project(o, p)
        );
        assert_eq!(
            owner(o, Tier::User, None, Some(u)).unwrap(),
            Owner::user(o, u)
        );
        assert!(
            owner(o, Tier::Project, None, None)
                .unwrap_err()
                .contains("--project")
        );
        assert!(
            owner(o, Tier::User, Some(p), None)
                .unwrap_err()
                .contains("--user")
        );
        assert!(owner(o, Tier::Org, Some(p), None).is_err());
        assert!(parse_tier("team").is_err());
        assert_eq!(parse_tier("user").unwrap(), Tier::User);
    }
}
