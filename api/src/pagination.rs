//! Cursor pagination: `?limit=` (default 50, at most 200) and `?cursor=` (opaque: the position
//! `(created_at, id)` of the last item of the previous page, base64url-encoded).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use store::projects::Cursor;
use uuid::Uuid;

use crate::error::ApiError;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

pub struct PageRequest {
    pub limit: i64,
    pub after: Option<Cursor>,
}

impl PageRequest {
    pub fn parse(limit: Option<i64>, cursor: Option<&str>) -> Result<Self, ApiError> {
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            )));
        }
        let after = match cursor {
            None | Some("") => None,
            Some(c) => Some(decode(c).ok_or_else(|| ApiError::invalid("cursor is invalid"))?),
        };
        Ok(Self { limit, after })
    }

    /// Rows to fetch: one more than the page, to learn whether another page follows.
    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }

    /// Cut `rows` (fetched with [`Self::fetch`]) to the page; the cursor of the next page, if any.
    pub fn finish<T>(
        &self,
        mut rows: Vec<T>,
        position: impl Fn(&T) -> Cursor,
    ) -> (Vec<T>, Option<String>) {
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        if rows.len() > limit {
            rows.truncate(limit);
            let next = rows.last().map(|r| encode(position(r)));
            (rows, next)
        } else {
            (rows, None)
        }
    }
}

/// Pagination over an ordered sequence number (messages of a conversation): same `limit`, a
/// cursor holding the last `seq` seen.
pub struct SeqPageRequest {
    pub limit: i64,
    pub after: Option<i64>,
}

impl SeqPageRequest {
    pub fn parse(limit: Option<i64>, cursor: Option<&str>) -> Result<Self, ApiError> {
        let page = PageRequest::parse(limit, None)?;
        let after = match cursor {
            None | Some("") => None,
            Some(c) => Some(
                URL_SAFE_NO_PAD
                    .decode(c)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|t| t.strip_prefix("s:").and_then(|n| n.parse::<i64>().ok()))
                    .ok_or_else(|| ApiError::invalid("cursor is invalid"))?,
            ),
        };
        Ok(Self {
            limit: page.limit,
            after,
        })
    }

    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }

    /// Cut `rows` to the page; the cursor of the next page, if any.
    pub fn finish<T>(&self, mut rows: Vec<T>, seq: impl Fn(&T) -> i64) -> (Vec<T>, Option<String>) {
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        if rows.len() > limit {
            rows.truncate(limit);
            let next = rows
                .last()
                .map(|r| URL_SAFE_NO_PAD.encode(format!("s:{}", seq(r))));
            (rows, next)
        } else {
            (rows, None)
        }
    }
}

pub fn encode((at, id): Cursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", at.timestamp_micros(), id.simple()))
}

fn decode(raw: &str) -> Option<Cursor> {
    let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (micros, id) = text.split_once(':')?;
    let at: DateTime<Utc> = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, Uuid::parse_str(id).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let at = DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap();
        let id = Uuid::now_v7();
        let c = encode((at, id));
        let p = PageRequest::parse(Some(10), Some(&c)).unwrap();
        assert_eq!(p.after, Some((at, id)));
        assert!(PageRequest::parse(None, Some("not-a-cursor")).is_err());
        assert!(PageRequest::parse(Some(0), None).is_err());
        assert!(PageRequest::parse(Some(201), None).is_err());
        assert_eq!(PageRequest::parse(None, None).unwrap().limit, 50);
    }
}
