//! Text extraction for uploaded documents: what gets stored and indexed is plain text.
//!
//! - `text/plain`, `text/markdown`: UTF-8 (a BOM is dropped); Markdown is kept as written (the
//!   indexer chunks it by headings).
//! - `text/html`: tags removed, `<script>`, `<style>`, `<noscript>`, `<template>` and comments
//!   dropped with their content, block elements become line breaks, entities decoded.
//! - `application/pdf`: the text of every page, by `lopdf` (pure Rust). The streams text
//!   extraction reads (every page's content, every font's `ToUnicode` map) are decompressed
//!   once, in place, against one budget for the whole file (`PDF_DECOMPRESSED_LIMIT`), so
//!   neither one page nor many pages of a small file can inflate without limit; the text
//!   itself is bounded by `PDF_TEXT_LIMIT`.
//!
//! Every extractor is total: any bytes give text or a 422, never a panic, in time linear in
//! the input (property tests below feed random and adversarial input).

use crate::error::ApiError;

/// The document types we accept (the `documents.content_type` values).
pub const CONTENT_TYPES: [&str; 4] = [
    "text/plain",
    "text/markdown",
    "text/html",
    "application/pdf",
];

/// Bound on everything a PDF's text extraction decompresses, all pages together.
const PDF_DECOMPRESSED_LIMIT: usize = 64 * 1024 * 1024;
/// Bound on the text extracted from one PDF.
const PDF_TEXT_LIMIT: usize = 16 * 1024 * 1024;

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
/// Runs on the blocking pool: parsing a 10 MiB upload is CPU work.
pub async fn extract(field: &str, content_type: &str, bytes: Vec<u8>) -> Result<String, ApiError> {
    let (field, content_type) = (field.to_owned(), content_type.to_owned());
    tokio::task::spawn_blocking(move || extract_blocking(&field, &content_type, bytes))
        .await
        .map_err(ApiError::internal)?
}

fn extract_blocking(field: &str, content_type: &str, bytes: Vec<u8>) -> Result<String, ApiError> {
    let text = match content_type {
        "application/pdf" => match pdf_text(&bytes, PDF_DECOMPRESSED_LIMIT, PDF_TEXT_LIMIT) {
            Ok(text) => text,
            Err(PdfError::Unreadable) => return Err(unreadable(field, "is not a readable PDF")),
            Err(PdfError::TooLarge) => {
                return Err(unreadable(
                    field,
                    &format!(
                        "decompresses to more than {} MiB of page content or holds more than {} MiB of text; split it into smaller documents",
                        PDF_DECOMPRESSED_LIMIT >> 20,
                        PDF_TEXT_LIMIT >> 20
                    ),
                ));
            }
        },
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

#[derive(Debug, PartialEq, Eq)]
enum PdfError {
    Unreadable,
    TooLarge,
}

/// The text of every page of a PDF; see the module comment for the bounds.
fn pdf_text(
    bytes: &[u8],
    decompressed_limit: usize,
    text_limit: usize,
) -> Result<String, PdfError> {
    use lopdf::{Object, ObjectId};
    let options = lopdf::LoadOptions {
        // object and cross-reference streams, decoded while loading
        max_decompressed_size: Some(decompressed_limit),
        ..lopdf::LoadOptions::default()
    };
    let mut doc =
        lopdf::Document::load_mem_with_options(bytes, options).map_err(|_| PdfError::Unreadable)?;
    let pages: Vec<(u32, ObjectId)> = doc.get_pages().into_iter().collect();
    if pages.is_empty() {
        return Err(PdfError::Unreadable);
    }
    // What extraction will read: page content streams and fonts' ToUnicode maps.
    let mut streams: std::collections::BTreeSet<ObjectId> = std::collections::BTreeSet::new();
    for (_, page) in &pages {
        streams.extend(doc.get_page_contents(*page));
        if let Ok(fonts) = doc.get_page_fonts(*page) {
            for font in fonts.values() {
                if let Ok(Object::Reference(id)) = font.get(b"ToUnicode") {
                    streams.insert(*id);
                }
            }
        }
    }
    // Decompress each of them once, in place, against one budget for the whole file.
    let mut budget = decompressed_limit;
    let mut largest = 0;
    for id in streams {
        let Ok(Object::Stream(stream)) = doc.get_object_mut(id) else {
            continue;
        };
        let plain = if stream.is_compressed() {
            match stream.decompressed_content_with_limit(budget) {
                Ok(data) => data,
                Err(lopdf::Error::Decompress(lopdf::DecompressError::MemoryLimitExceeded {
                    ..
                })) => return Err(PdfError::TooLarge),
                // lopdf reads a stream it cannot decode as its raw bytes; so do we
                Err(_) => std::mem::take(&mut stream.content),
            }
        } else {
            std::mem::take(&mut stream.content)
        };
        budget = budget.checked_sub(plain.len()).ok_or(PdfError::TooLarge)?;
        largest = largest.max(plain.len());
        stream.set_plain_content(plain);
    }
    // Everything extraction reads is plain now; the limit only refuses a stream it would
    // still have to inflate (one reached another way) beyond the largest we prepared.
    let numbers: Vec<u32> = pages.iter().map(|(n, _)| *n).collect();
    let mut text = String::new();
    let mut any = false;
    for fragment in doc.extract_text_chunks_with_limit(&numbers, largest) {
        match fragment {
            Ok(t) => {
                any = true;
                if text.len() + t.len() > text_limit {
                    return Err(PdfError::TooLarge);
                }
                text.push_str(&t);
            }
            Err(lopdf::Error::Decompress(lopdf::DecompressError::MemoryLimitExceeded {
                ..
            })) => return Err(PdfError::TooLarge),
            // a broken font or operator loses its own text, not the document's
            Err(_) => {}
        }
    }
    if any {
        Ok(text)
    } else {
        Err(PdfError::Unreadable)
    }
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
        // `;` is ASCII, so its byte position is a character boundary; the window of 12 bytes
        // may end inside a multi-byte character, hence the search in bytes.
        let Some(semi) = rest.as_bytes()[..rest.len().min(12)]
            .iter()
            .position(|b| *b == b';')
        else {
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
    fn an_entity_cut_inside_a_multibyte_character_is_kept_as_text() {
        // the 12-byte window for the entity name used to end inside `é` / `日`: a panic
        assert_eq!(html_text("<p>&aaaaaaaaaaé</p>"), "&aaaaaaaaaaé");
        assert_eq!(html_text("&日本語です"), "&日本語です");
        assert_eq!(html_text("&amp;日本&#x65E5;"), "&日本日");
    }

    /// A PDF with one page per entry of `pages`, each page's content compressed.
    fn pdf(pages: &[Vec<u8>]) -> Vec<u8> {
        use lopdf::{Document, Object, Stream, dictionary};
        let mut doc = Document::with_version("1.5");
        let pages_id = doc.new_object_id();
        let font_id = doc.add_object(dictionary! {
            "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Courier",
        });
        let resources_id = doc.add_object(dictionary! {
            "Font" => dictionary! { "F1" => font_id },
        });
        let mut kids = Vec::new();
        for content in pages {
            let mut stream = Stream::new(dictionary! {}, content.clone());
            stream.compress().unwrap();
            let content_id = doc.add_object(stream);
            kids.push(Object::from(doc.add_object(dictionary! {
                "Type" => "Page", "Parent" => pages_id, "Contents" => content_id,
            })));
        }
        let count = kids.len() as i64;
        doc.objects.insert(
            pages_id,
            Object::Dictionary(dictionary! {
                "Type" => "Pages", "Kids" => kids, "Count" => count,
                "Resources" => resources_id,
                "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
            }),
        );
        let catalog_id = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
        doc.trailer.set("Root", catalog_id);
        let mut out = Vec::new();
        doc.save_to(&mut out).unwrap();
        out
    }

    fn page_showing(text: &str, padding: usize) -> Vec<u8> {
        format!(
            "BT /F1 12 Tf 50 700 Td ({text}) Tj ET\n{}",
            " ".repeat(padding)
        )
        .into_bytes()
    }

    #[test]
    fn pdf_decompression_is_capped_for_the_whole_file_not_per_page() {
        let limit = 256 * 1024;
        // every page alone is well under the limit; together they pass it
        let pages: Vec<Vec<u8>> = (0..4)
            .map(|i| page_showing(&format!("page {i}"), 100 * 1024))
            .collect();
        let bytes = pdf(&pages);
        assert!(bytes.len() < 8 * 1024, "small file: {}", bytes.len());
        assert_eq!(pdf_text(&bytes, limit, limit), Err(PdfError::TooLarge));
        // two of them fit
        let text = pdf_text(&pdf(&pages[..2]), limit, limit).unwrap();
        assert!(text.contains("page 0") && text.contains("page 1"), "{text}");
        // the text bound holds on its own
        assert_eq!(
            pdf_text(&pdf(&pages[..2]), limit, 4),
            Err(PdfError::TooLarge)
        );
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

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Pieces that hit the HTML extractor's edges: tags, dropped elements, comments,
        /// entities (complete, cut, numeric out of range), quotes, multi-byte text, NUL.
        fn html_piece() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("<".to_owned()),
                Just(">".to_owned()),
                Just("&".to_owned()),
                Just(";".to_owned()),
                Just("&#".to_owned()),
                Just("&#x".to_owned()),
                Just("&#x110000;".to_owned()),
                Just("&#99999999999;".to_owned()),
                Just("&amp;".to_owned()),
                Just("&nbsp".to_owned()),
                Just("<script>".to_owned()),
                Just("</script".to_owned()),
                Just("<STYLE a='>'>".to_owned()),
                Just("<!--".to_owned()),
                Just("-->".to_owned()),
                Just("<p>".to_owned()),
                Just("</".to_owned()),
                Just("\"".to_owned()),
                Just("'".to_owned()),
                Just("é".to_owned()),
                Just("日本語".to_owned()),
                Just("\u{1F600}".to_owned()),
                Just("\0".to_owned()),
                Just("\n".to_owned()),
                "[a-z ]{0,12}",
                any::<String>(),
            ]
        }

        fn html_input() -> impl Strategy<Value = String> {
            prop::collection::vec(html_piece(), 0..64).prop_map(|v| v.concat())
        }

        /// Bytes of a real PDF with some of them replaced, inserted or cut off.
        fn mutated_pdf() -> impl Strategy<Value = Vec<u8>> {
            let base = pdf(&[page_showing("hello", 0), page_showing("world", 10)]);
            let len = base.len();
            (
                prop::collection::vec((0..len, any::<u8>()), 0..16),
                prop::collection::vec((0..len, any::<u8>()), 0..4),
                0..=len,
            )
                .prop_map(move |(replace, insert, keep)| {
                    let mut b = base.clone();
                    for (i, v) in replace {
                        b[i] = v;
                    }
                    for (i, v) in insert {
                        b.insert(i.min(b.len()), v);
                    }
                    b.truncate(keep.max(1));
                    b
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn html_never_panics_and_never_grows(input in html_input()) {
                let text = html_text(&input);
                prop_assert!(text.len() <= input.len(), "{} > {}", text.len(), input.len());
            }

            #[test]
            fn text_types_never_panic_and_stay_within_the_input(
                bytes in prop::collection::vec(any::<u8>(), 0..2048),
                kind in 0usize..3,
            ) {
                let ct = ["text/plain", "text/markdown", "text/html"][kind];
                let len = bytes.len();
                match extract_blocking("file", ct, bytes) {
                    Ok(text) => {
                        prop_assert!(text.len() <= len);
                        prop_assert!(!text.contains('\0'));
                    }
                    Err(e) => prop_assert_eq!(e.status().as_u16(), 422),
                }
            }

            #[test]
            fn random_bytes_as_pdf_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
                let _ = pdf_text(&bytes, 1 << 20, 1 << 20);
            }

            #[test]
            fn a_damaged_pdf_never_panics_and_stays_within_the_limits(bytes in mutated_pdf()) {
                let limit = 64 * 1024;
                if let Ok(text) = pdf_text(&bytes, limit, limit) {
                    prop_assert!(text.len() <= limit);
                }
            }
        }
    }
}
