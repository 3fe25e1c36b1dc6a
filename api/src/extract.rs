//! Text extraction for uploaded documents: what gets stored and indexed is plain text.
//!
//! - `text/plain`, `text/markdown`: UTF-8 (a BOM is dropped); Markdown is kept as written (the
//!   indexer chunks it by headings).
//! - `text/html`: tags removed, `<script>`, `<style>`, `<noscript>`, `<template>` and comments
//!   dropped with their content, block elements become line breaks, entities decoded.
//! - `application/pdf`: the text of every page, by `lopdf` (pure Rust), with the decompressed
//!   content of each page bounded (a small file cannot inflate without limit).

use crate::error::ApiError;

/// The document types we accept (the `documents.content_type` values).
pub const CONTENT_TYPES: [&str; 4] = [
    "text/plain",
    "text/markdown",
    "text/html",
    "application/pdf",
];

/// Bound on the decompressed content of one PDF page.
const PDF_PAGE_LIMIT: usize = 64 * 1024 * 1024;

/// The supported content type a declared one stands for (parameters and case ignored, common
/// aliases accepted), or `None`.
pub fn normalize_content_type(declared: &str) -> Option<&'static str> {
    let essence = declared
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "text/plain" => Some("text/plain"),
        "text/markdown" | "text/x-markdown" => Some("text/markdown"),
        "text/html" | "application/xhtml+xml" => Some("text/html"),
        "application/pdf" => Some("application/pdf"),
        _ => None,
    }
}

/// The content type a file name suggests (for parts sent without a useful type).
pub fn content_type_from_name(name: &str) -> Option<&'static str> {
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    match ext.as_str() {
        "txt" | "text" => Some("text/plain"),
        "md" | "markdown" => Some("text/markdown"),
        "html" | "htm" => Some("text/html"),
        "pdf" => Some("application/pdf"),
        _ => None,
    }
}

fn unreadable(field: &str, what: &str) -> ApiError {
    ApiError::Unprocessable {
        code: "unreadable_document",
        message: format!("{field}: {what}"),
    }
}

/// Extract the text of `bytes` of `content_type` (one of [`CONTENT_TYPES`]). 422 when the
/// content is not what it claims to be or holds no text; `field` names the request field.
pub async fn extract(field: &str, content_type: &str, bytes: Vec<u8>) -> Result<String, ApiError> {
    let text = match content_type {
        "application/pdf" => tokio::task::spawn_blocking(move || pdf_text(&bytes))
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| unreadable(field, "is not a readable PDF"))?,
        _ => {
            let s = String::from_utf8(bytes).map_err(|_| unreadable(field, "is not UTF-8 text"))?;
            let s = s.strip_prefix('\u{feff}').unwrap_or(&s).to_owned();
            if content_type == "text/html" {
                html_text(&s)
            } else {
                s
            }
        }
    };
    // PostgreSQL text cannot hold NUL; other control characters are harmless for indexing.
    let text = text.replace('\0', "");
    if text.trim().is_empty() {
        return Err(unreadable(field, "contains no text"));
    }
    Ok(text)
}

fn pdf_text(bytes: &[u8]) -> Option<String> {
    let doc = lopdf::Document::load_mem(bytes).ok()?;
    let pages: Vec<u32> = doc.get_pages().keys().copied().collect();
    if pages.is_empty() {
        return None;
    }
    doc.extract_text_with_limit(&pages, PDF_PAGE_LIMIT).ok()
}

/// Elements whose content is not text for a reader.
const DROPPED: [&str; 4] = ["script", "style", "noscript", "template"];
/// Elements that break a line.
const BLOCKS: [&str; 26] = [
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "tr",
    "td",
    "th",
    "table",
    "section",
    "article",
    "header",
    "footer",
    "blockquote",
    "pre",
    "title",
    "hr",
    "dt",
    "dd",
];

/// The readable text of an HTML document.
pub fn html_text(html: &str) -> String {
    let lower = html.to_ascii_lowercase();
    let bytes = html.as_bytes();
    let mut out = String::with_capacity(html.len() / 2);
    let mut i = 0;
    let mut text_start = 0;
    while i < bytes.len() {
        if bytes[i] != b'<' {
            i += 1;
            continue;
        }
        out.push_str(&decode_entities(&html[text_start..i]));
        if lower[i..].starts_with("<!--") {
            i = lower[i + 4..]
                .find("-->")
                .map_or(bytes.len(), |p| i + 4 + p + 3);
            text_start = i;
            continue;
        }
        let end = tag_end(bytes, i);
        let inner = if end < bytes.len() || bytes[end - 1] == b'>' {
            &lower[i + 1..end - 1]
        } else {
            &lower[i + 1..]
        };
        let closing = inner.starts_with('/');
        let name: String = inner
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        i = end;
        if !closing && DROPPED.contains(&name.as_str()) {
            let close = format!("</{name}");
            i = lower[i..]
                .find(&close)
                .map_or(bytes.len(), |p| tag_end(bytes, i + p));
        } else if BLOCKS.contains(&name.as_str()) {
            out.push('\n');
        } else if !name.is_empty() {
            out.push(' ');
        }
        text_start = i;
    }
    if text_start < bytes.len() {
        out.push_str(&decode_entities(&html[text_start..]));
    }
    tidy(&out)
}

/// The index just past the `>` that ends the tag starting at `start` (quotes respected).
fn tag_end(bytes: &[u8], start: usize) -> usize {
    let mut quote: Option<u8> = None;
    let mut i = start + 1;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'>' => return i + 1,
            None => {}
        }
        i += 1;
    }
    bytes.len()
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find('&') {
        out.push_str(&rest[..p]);
        rest = &rest[p..];
        let Some(semi) = rest[..rest.len().min(12)].find(';') else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some(' '),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Collapse runs of spaces within lines and of blank lines.
fn tidy(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank = 0;
    for line in s.lines() {
        let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if line.is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(&line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_drops_scripts_styles_and_comments_and_keeps_text() {
        let html = r#"<html><head><title>T</title><style>body{color:red}</style>
            <script type="text/javascript">var secret = "<b>x</b>";</script></head>
            <body><!-- hidden --><h1>Hello &amp; welcome</h1><p>First <b>bold</b> para&#33;</p>
            <div data-x="a>b">Second</div><SCRIPT>alert(1)</SCRIPT></body></html>"#;
        let t = html_text(html);
        assert!(
            !t.contains("secret") && !t.contains("color") && !t.contains("alert"),
            "{t}"
        );
        assert!(!t.contains("hidden"), "{t}");
        assert!(t.contains("Hello & welcome"), "{t}");
        assert!(t.contains("First bold para!"), "{t}");
        assert!(t.contains("Second"), "{t}");
        assert!(!t.contains('<'), "{t}");
    }

    #[test]
    fn content_types_are_normalized() {
        assert_eq!(
            normalize_content_type("Text/Markdown; charset=utf-8"),
            Some("text/markdown")
        );
        assert_eq!(normalize_content_type("image/png"), None);
        assert_eq!(content_type_from_name("a.PDF"), Some("application/pdf"));
        assert_eq!(content_type_from_name("noext"), None);
    }
}
