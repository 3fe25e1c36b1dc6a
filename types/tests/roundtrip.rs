//! The wire forms of ids and enums: an id is its bare UUID string, an enum its lowercase name,
//! and both parse back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::str::FromStr;

use types::{
    ActionStatus, ConversationId, DocumentStatus, ErrorCode, OrgId, ResponseStatus, Role,
    TaskStatus, Visibility,
};
use uuid::Uuid;

#[test]
fn an_id_serialises_as_its_uuid() {
    let uuid = Uuid::now_v7();
    let id = OrgId::from(uuid);
    assert_eq!(
        serde_json::to_string(&id).unwrap(),
        serde_json::to_string(&uuid).unwrap()
    );
    assert_eq!(
        serde_json::from_str::<OrgId>(&format!("\"{uuid}\"")).unwrap(),
        id
    );
    assert_eq!(id.to_string(), uuid.to_string());
    assert_eq!(format!("{id:?}"), format!("{uuid:?}"));
    assert_eq!(OrgId::from_str(&uuid.to_string()).unwrap(), id);
    assert!(OrgId::from_str("not-a-uuid").is_err());
    assert_eq!(id.into_uuid(), uuid);
    assert_eq!(*id.as_uuid(), uuid);
    assert_eq!(Uuid::from(id), uuid);
}

#[test]
fn new_ids_are_v7_and_ordered() {
    let a = ConversationId::new_v7();
    let b = ConversationId::new_v7();
    assert_eq!(a.as_uuid().get_version_num(), 7);
    assert!(a < b);
}

fn check<T>(all: &[T])
where
    T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + FromStr,
    T: serde::Serialize + serde::de::DeserializeOwned,
    <T as FromStr>::Err: std::fmt::Debug,
{
    for &v in all {
        let text = v.to_string();
        assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{text}\""));
        assert_eq!(
            serde_json::from_str::<T>(&format!("\"{text}\"")).unwrap(),
            v
        );
        assert_eq!(text.parse::<T>().unwrap(), v);
    }
    assert!("nope".parse::<T>().is_err());
    assert!(serde_json::from_str::<T>("\"nope\"").is_err());
}

#[test]
fn enums_serialise_as_their_stored_text() {
    check(Role::ALL);
    check(Visibility::ALL);
    check(TaskStatus::ALL);
    check(ResponseStatus::ALL);
    check(ActionStatus::ALL);
    check(DocumentStatus::ALL);
    check(ErrorCode::ALL);
}

#[test]
fn the_wire_names_are_the_documented_ones() {
    let names = |all: &[ErrorCode]| all.iter().map(|c| c.as_str()).collect::<Vec<_>>();
    assert_eq!(
        names(ErrorCode::ALL),
        [
            "rate_limited",
            "model_unavailable",
            "model_stream_failed",
            "internal_error",
            "events_expired"
        ]
    );
    assert_eq!(TaskStatus::InProgress.as_str(), "in_progress");
    assert_eq!(ResponseStatus::Completed.as_str(), "completed");
    assert_eq!(ActionStatus::Pending.as_str(), "pending");
}
