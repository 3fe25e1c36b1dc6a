//! Documents (docs/architecture/indexing.md, "Documents API"): upload into a project, read the
//! status, delete.
//!
//! - Upload: whoever can see the project may upload to it (the same rule as creating a task);
//!   a project the caller cannot see answers 404. Multipart (part `file`, optional JSON part
//!   `meta`) or JSON (`content` as text; base64 for `application/pdf`). The body is limited to
//!   `MAX_UPLOAD_BYTES` before it is read (413); the text is extracted here and the document
//!   is queued for indexing (its outbox row commits with it); an `index` job is requested so
//!   it does not wait for the scheduled run (at most one request per 10 s for all uploads).
//! - Read (`GET /v1/documents/{id}`, `GET /v1/projects/{id}/documents`): users who may see
//!   the document's content — who can see the project *and*, for a restricted document, are
//!   listed in `visible_to_user_ids`, belong to a team of `visible_to_team_ids`, or uploaded it
//!   (`can_see_document`) — and the org's owners and admins, who may manage (list, read the
//!   metadata of, delete) every document of their org without its content entering their
//!   prompts unless they may see it. Anyone else gets 404, another org's user too.
//! - Delete: the uploader (while they can see it), or an owner/admin of the org; another user
//!   who can see the document gets 403. The tombstone, the removal of its chunks, of what was
//!   derived from it (memory facts, message chunks; summaries start over) and the outbox row
//!   commit together, so the content stops being retrievable at once; the document then
//!   answers 404.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::types::multipart::Upload;
use poem_openapi::{ApiRequest, ApiResponse, Multipart, Object, OpenApi};
use serde::Deserialize;
use store::{TeamId, UserId};
use uuid::Uuid;

use super::Tag;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::extract;
use crate::pagination::PageRequest;
use crate::state::AppState;
use crate::validate;

pub struct DocumentsApi {
    pub state: AppState,
}

const TITLE_MAX: usize = 500;
const RESTRICTION_MAX: usize = 1000;

/// A document given as JSON.
#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct NewDocumentJson {
    title: String,
    /// The text (for `application/pdf`: the file, base64-encoded).
    content: String,
    /// `text/plain`, `text/markdown`, `text/html` or `application/pdf`.
    content_type: String,
    /// Restrict the document to these users (members of the project's org) ...
    #[serde(default)]
    #[oai(nullable)]
    visible_to_user_ids: Option<Vec<Uuid>>,
    /// ... and/or to the members of these teams (of the project's org).
    #[serde(default)]
    #[oai(nullable)]
    visible_to_team_ids: Option<Vec<Uuid>>,
}

/// The optional `meta` part of a multipart upload.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UploadMeta {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    visible_to_user_ids: Option<Vec<Uuid>>,
    #[serde(default)]
    visible_to_team_ids: Option<Vec<Uuid>>,
}

/// A multipart upload.
#[derive(Multipart)]
pub struct DocumentUpload {
    /// The file: text/plain, text/markdown, text/html or application/pdf (the part's type, or
    /// else the file name's extension, decides). Required.
    file: Option<Upload>,
    /// JSON `{title?, visible_to_user_ids?, visible_to_team_ids?}`.
    meta: Option<String>,
}

#[derive(ApiRequest)]
pub enum NewDocumentRequest {
    Json(JsonBody<NewDocumentJson>),
    Multipart(DocumentUpload),
}

#[derive(Object)]
pub struct DocumentQueued {
    id: Uuid,
    /// Always `queued`.
    status: String,
}

#[derive(ApiResponse)]
pub enum DocumentCreated {
    /// Accepted: the document is stored and will be indexed by the next `index` run.
    #[oai(status = 202)]
    Accepted(Json<DocumentQueued>),
}

#[derive(ApiResponse)]
pub enum DocumentDeleted {
    #[oai(status = 204)]
    NoContent,
}

/// A document's metadata.
#[derive(Object)]
pub struct DocumentView {
    id: Uuid,
    project_id: Uuid,
    title: String,
    content_type: String,
    /// Size of what was uploaded.
    byte_size: i64,
    #[oai(nullable)]
    uploaded_by: Option<Uuid>,
    visible_to_user_ids: Vec<Uuid>,
    visible_to_team_ids: Vec<Uuid>,
    /// `queued` | `indexed` | `failed`
    status: String,
    /// Why indexing failed (only when `failed`).
    #[oai(nullable)]
    failure_reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    #[oai(nullable)]
    indexed_at: Option<DateTime<Utc>>,
}

impl From<store::documents::Document> for DocumentView {
    fn from(d: store::documents::Document) -> Self {
        Self {
            id: d.id.into(),
            project_id: d.project_id.into(),
            title: d.title,
            content_type: d.content_type,
            byte_size: d.byte_size,
            uploaded_by: d.uploaded_by.map(Into::into),
            visible_to_user_ids: d.visible_to_user_ids.into_iter().map(Into::into).collect(),
            visible_to_team_ids: d.visible_to_team_ids.into_iter().map(Into::into).collect(),
            failure_reason: if d.status == "failed" {
                d.failure_reason
            } else {
                None
            },
            status: d.status,
            created_at: d.created_at,
            updated_at: d.updated_at,
            indexed_at: d.indexed_at,
        }
    }
}

/// A page of documents.
#[derive(Object)]
pub struct DocumentPage {
    items: Vec<DocumentView>,
    /// Pass as `?cursor=` for the next page; null on the last page.
    #[oai(nullable)]
    next_cursor: Option<String>,
}

/// What an upload boils down to, whichever its form.
struct Incoming {
    title: String,
    content_type: &'static str,
    bytes: Vec<u8>,
    /// The request field that holds the content (for error messages).
    field: &'static str,
    user_ids: Vec<UserId>,
    team_ids: Vec<TeamId>,
}

fn unsupported(field: &str, got: &str) -> ApiError {
    ApiError::UnsupportedMediaType(format!(
        "{field}: unsupported content type {got:?}; use one of {}",
        extract::CONTENT_TYPES.join(", ")
    ))
}

fn restriction<Id: From<Uuid> + Ord>(
    field: &str,
    ids: Option<Vec<Uuid>>,
) -> Result<Vec<Id>, ApiError> {
    let mut ids: Vec<Id> = ids.unwrap_or_default().into_iter().map(Id::from).collect();
    if ids.len() > RESTRICTION_MAX {
        return Err(ApiError::invalid(format!(
            "{field} must have at most {RESTRICTION_MAX} entries"
        )));
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

impl Incoming {
    fn from_json(j: NewDocumentJson) -> Result<Self, ApiError> {
        let content_type = extract::normalize_content_type(&j.content_type)
            .ok_or_else(|| unsupported("content_type", &j.content_type))?;
        let bytes = if content_type == "application/pdf" {
            base64::engine::general_purpose::STANDARD
                .decode(j.content.trim())
                .map_err(|_| {
                    ApiError::invalid("content: must be base64 for content_type application/pdf")
                })?
        } else {
            j.content.into_bytes()
        };
        Ok(Self {
            title: validate::text("title", &j.title, TITLE_MAX)?,
            content_type,
            bytes,
            field: "content",
            user_ids: restriction("visible_to_user_ids", j.visible_to_user_ids)?,
            team_ids: restriction("visible_to_team_ids", j.visible_to_team_ids)?,
        })
    }

    async fn from_multipart(m: DocumentUpload) -> Result<Self, ApiError> {
        let meta: UploadMeta = match m.meta.as_deref().map(str::trim) {
            None | Some("") => UploadMeta::default(),
            Some(raw) => crate::body::parse(raw.as_bytes())
                .map_err(|e| ApiError::invalid(format!("meta: {e}")))?,
        };
        let file = m
            .file
            .ok_or_else(|| ApiError::invalid("file: a part named `file` is required"))?;
        let declared = file.content_type().map(str::to_owned);
        let file_name = file.file_name().map(str::to_owned);
        let by_type = declared
            .as_deref()
            .and_then(extract::normalize_content_type);
        let generic = declared.as_deref().is_none_or(|t| {
            let t = t.trim().to_ascii_lowercase();
            t.is_empty() || t.starts_with("application/octet-stream")
        });
        let content_type = match (by_type, generic) {
            (Some(t), _) => t,
            (None, true) => file_name
                .as_deref()
                .and_then(extract::content_type_from_name)
                .ok_or_else(|| unsupported("file", declared.as_deref().unwrap_or("none")))?,
            (None, false) => return Err(unsupported("file", declared.as_deref().unwrap_or(""))),
        };
        let title = match meta.title {
            Some(t) => validate::text("meta.title", &t, TITLE_MAX)?,
            None => {
                let name = file_name.as_deref().unwrap_or("").trim();
                let name: String = name
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(TITLE_MAX)
                    .collect();
                if name.is_empty() {
                    "Untitled document".to_owned()
                } else {
                    name
                }
            }
        };
        let bytes = file.into_vec().await.map_err(ApiError::internal)?;
        Ok(Self {
            title,
            content_type,
            bytes,
            field: "file",
            user_ids: restriction("meta.visible_to_user_ids", meta.visible_to_user_ids)?,
            team_ids: restriction("meta.visible_to_team_ids", meta.visible_to_team_ids)?,
        })
    }
}

/// Uploads ask for an index run at most once per this many seconds.
const INDEX_REQUEST_WINDOW_SECS: u64 = 10;

impl DocumentsApi {
    /// Ask for an index run soon instead of waiting for the scheduled one: at most one
    /// `index` job per `INDEX_REQUEST_WINDOW_SECS` for all uploads (a tick marker, like the
    /// scheduler's). The document is already safe in the outbox, so a failure here only delays
    /// its indexing to the next scheduled run; the upload does not fail for it.
    async fn request_index_run(&self) {
        let window = chrono::Utc::now().timestamp().max(0) as u64 / INDEX_REQUEST_WINDOW_SECS;
        let job = jobs::kinds::Index {
            reason: jobs::kinds::IndexReason::Requested,
        };
        let marker_ttl = std::time::Duration::from_secs(INDEX_REQUEST_WINDOW_SECS * 6);
        if let Err(e) = self
            .state
            .bus
            .enqueue_tick("index-upload", window, "api", marker_ttl, job)
            .await
        {
            tracing::warn!(error = %e, "cannot request an index run; the scheduled one will index the document");
        }
    }
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Documents")]
impl DocumentsApi {
    /// Upload a document into a project the caller can see; it is indexed by the next `index`
    /// run (status `queued` until then).
    #[oai(path = "/projects/:id/documents", method = "post")]
    async fn create(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: NewDocumentRequest,
    ) -> Result<DocumentCreated, ApiError> {
        let caller = auth.0;
        let limit = self.state.settings.api.max_upload_bytes;
        // Visibility first: a hidden project answers 404 whatever the body holds.
        {
            let mut conn = self.state.db.acquire().await?;
            if !store::projects::can_see(&mut conn, caller.user_id.into(), id.0.into()).await? {
                return Err(ApiError::NotFound);
            }
        }
        let incoming = match body {
            NewDocumentRequest::Json(j) => Incoming::from_json(j.0)?,
            NewDocumentRequest::Multipart(m) => Incoming::from_multipart(m).await?,
        };
        if incoming.bytes.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        let byte_size = i64::try_from(incoming.bytes.len()).unwrap_or(i64::MAX);
        let text = extract::extract(incoming.field, incoming.content_type, incoming.bytes).await?;
        let mut tx = self.state.db.begin().await?;
        let project = store::projects::get_visible(&mut tx, caller.user_id.into(), id.0.into())
            .await?
            .ok_or(ApiError::NotFound)?;
        let doc = store::documents::insert(
            &mut tx,
            &store::documents::NewDocument {
                org_id: project.org_id,
                project_id: project.id,
                uploaded_by: caller.user_id.into(),
                title: &incoming.title,
                content_type: incoming.content_type,
                byte_size,
                content: &text,
                visible_to_user_ids: &incoming.user_ids,
                visible_to_team_ids: &incoming.team_ids,
            },
        )
        .await?;
        tx.commit().await?;
        tracing::info!(document_id = %doc.id, project_id = %project.id, bytes = byte_size,
            content_type = incoming.content_type, "document queued for indexing");
        self.request_index_run().await;
        Ok(DocumentCreated::Accepted(Json(DocumentQueued {
            id: doc.id.into(),
            status: doc.status,
        })))
    }

    /// The documents of a project the caller can see that the caller may see (or, as an org
    /// owner/admin, manage), oldest first: metadata only.
    #[oai(path = "/projects/:id/documents", method = "get")]
    async fn list(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// Page size, 1 to 200 (default 50).
        limit: Query<Option<i64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Json<DocumentPage>, ApiError> {
        let caller = auth.0;
        let page = PageRequest::parse(limit.0, cursor.0.as_deref())?;
        let mut conn = self.state.db.acquire().await?;
        if !store::projects::can_see(&mut conn, caller.user_id.into(), id.0.into()).await? {
            return Err(ApiError::NotFound);
        }
        let rows = store::documents::list_accessible(
            &mut conn,
            caller.user_id.into(),
            id.0.into(),
            page.after,
            page.fetch(),
        )
        .await?;
        let (rows, next_cursor) = page.finish(rows, |d| (d.created_at, d.id.into()));
        Ok(Json(DocumentPage {
            items: rows.into_iter().map(Into::into).collect(),
            next_cursor,
        }))
    }

    /// A document's metadata and indexing status (for whoever may see it, and the org's
    /// owners and admins).
    #[oai(path = "/documents/:id", method = "get")]
    async fn get(&self, auth: BearerAuth, id: Path<Uuid>) -> Result<Json<DocumentView>, ApiError> {
        let caller = auth.0;
        let mut conn = self.state.db.acquire().await?;
        let access =
            store::documents::get_accessible(&mut conn, caller.user_id.into(), id.0.into(), false)
                .await?
                .ok_or(ApiError::NotFound)?;
        Ok(Json(access.document.into()))
    }

    /// Delete a document (its uploader, or an org owner/admin): it stops being retrievable at
    /// once and then answers 404.
    #[oai(path = "/documents/:id", method = "delete")]
    async fn delete(&self, auth: BearerAuth, id: Path<Uuid>) -> Result<DocumentDeleted, ApiError> {
        let caller = auth.0;
        let mut tx = self.state.db.begin().await?;
        let access =
            store::documents::get_accessible(&mut tx, caller.user_id.into(), id.0.into(), true)
                .await?
                .ok_or(ApiError::NotFound)?;
        if !access.may_delete(caller.user_id.into()) {
            return Err(ApiError::Forbidden(
                "only the uploader or an organization admin may delete a document".into(),
            ));
        }
        if !store::documents::delete(&mut tx, &access.document).await? {
            return Err(ApiError::NotFound);
        }
        tx.commit().await?;
        Ok(DocumentDeleted::NoContent)
    }
}
