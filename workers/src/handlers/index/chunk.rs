//! Chunking for the index. Tokens are approximated as characters / 4 (`CHARS_PER_TOKEN`): the
//! budget is a size bound for the embedder's context, not an exact token count, and the
//! estimate needs no tokenizer of the embedding model.
//!
//! - Markdown is split on ATX headings (`#` … `######`, outside fenced code blocks); each
//!   section's chunks carry the heading path (`Guide > Install > Linux`) as their title.
//! - Other text is one section titled with the source's title.
//! - A section longer than the budget is cut at word boundaries into windows of at most
//!   `budget` tokens; consecutive windows of a section overlap by about `overlap` tokens. A
//!   single word longer than the budget is cut at a character boundary.
//! - Titles are bounded: one heading contributes at most `MAX_HEADING_CHARS` to a path (a
//!   longer heading's whole text also goes into its section's body, so no word is lost), and a
//!   chunk's title is at most `MAX_TITLE_CHARS`. A chunk's title and content feed the
//!   `embeddings.tsv` generated column and the embedder's input, so both stay bounded whatever
//!   was uploaded (PostgreSQL refuses a tsvector over 1 MB).

use sha2::{Digest, Sha256};

pub const CHARS_PER_TOKEN: usize = 4;
/// Characters one heading contributes to a heading path.
pub const MAX_HEADING_CHARS: usize = 120;
/// Characters of a chunk's title (heading path or source title).
pub const MAX_TITLE_CHARS: usize = 300;

/// `s` cut to at most `max` characters (the last one an ellipsis when cut).
pub fn bounded(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some(_) => {
            let keep = s
                .char_indices()
                .nth(max.saturating_sub(1))
                .map_or(0, |(i, _)| i);
            let mut out = s[..keep].trim_end().to_owned();
            out.push('…');
            out
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ChunkParams {
    /// Maximum tokens (characters / 4) per chunk.
    pub budget_tokens: usize,
    /// Tokens repeated from the end of a chunk at the start of the next one (< budget).
    pub overlap_tokens: usize,
}

impl ChunkParams {
    pub fn from_settings(s: &config::IndexSettings) -> Self {
        Self {
            budget_tokens: s.chunk_tokens,
            overlap_tokens: s.chunk_overlap_tokens,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub title: String,
    pub content: String,
}

/// The hash that decides whether a chunk must be embedded again: model, title and content.
pub fn content_hash(model: &str, title: &str, content: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    for part in [model, title, content] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().to_vec()
}

/// The text sent to the embedder for a chunk.
pub fn embedding_input(chunk: &Chunk) -> String {
    if chunk.title.is_empty() {
        chunk.content.clone()
    } else {
        format!("{}\n\n{}", chunk.title, chunk.content)
    }
}

/// Chunk a source's text. Empty (whitespace-only) text gives no chunks.
pub fn chunk_text(title: &str, text: &str, markdown: bool, params: ChunkParams) -> Vec<Chunk> {
    let sections = if markdown {
        markdown_sections(title, text)
    } else {
        vec![(title.to_owned(), text.to_owned())]
    };
    let mut out = Vec::new();
    for (section_title, body) in sections {
        let title = bounded(&section_title, MAX_TITLE_CHARS);
        for content in windows(&body, params) {
            out.push(Chunk {
                title: title.clone(),
                content,
            });
        }
    }
    out
}

/// Split Markdown into `(heading path, body)` sections. Text before the first heading is
/// titled with the document's title.
fn markdown_sections(doc_title: &str, text: &str) -> Vec<(String, String)> {
    let mut sections = Vec::new();
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut current_title = doc_title.to_owned();
    let mut body = String::new();
    let mut fence: Option<&str> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(f) = fence {
            if trimmed.starts_with(f) {
                fence = None;
            }
            body.push_str(line);
            body.push('\n');
            continue;
        }
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fence = Some(if trimmed.starts_with("```") {
                "```"
            } else {
                "~~~"
            });
            body.push_str(line);
            body.push('\n');
            continue;
        }
        if let Some((level, heading)) = heading(line) {
            sections.push((
                std::mem::take(&mut current_title),
                std::mem::take(&mut body),
            ));
            path.retain(|(l, _)| *l < level);
            let short = bounded(&heading, MAX_HEADING_CHARS);
            if short != heading {
                // the title keeps the start; the body keeps every word
                body.push_str(&heading);
                body.push('\n');
            }
            path.push((level, short));
            current_title = path
                .iter()
                .map(|(_, h)| h.as_str())
                .collect::<Vec<_>>()
                .join(" > ");
            continue;
        }
        body.push_str(line);
        body.push('\n');
    }
    sections.push((current_title, body));
    sections
        .into_iter()
        .filter(|(_, b)| !b.trim().is_empty())
        .collect()
}

/// An ATX heading: up to 3 spaces, 1–6 `#`, a space (or end of line), the text (trailing `#`s
/// dropped).
fn heading(line: &str) -> Option<(usize, String)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let level = rest.bytes().take_while(|b| *b == b'#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let after = &rest[level..];
    if !(after.is_empty() || after.starts_with(' ') || after.starts_with('\t')) {
        return None;
    }
    let text = after.trim().trim_end_matches('#').trim_end().to_owned();
    if text.is_empty() {
        return None;
    }
    Some((level, text))
}

/// Cut `text` into windows of at most `budget` tokens at word boundaries, consecutive windows
/// overlapping by about `overlap` tokens. The original text of a window is kept (line breaks
/// included), trimmed.
fn windows(text: &str, params: ChunkParams) -> Vec<String> {
    let budget = params.budget_tokens.max(1) * CHARS_PER_TOKEN;
    let overlap = params.overlap_tokens * CHARS_PER_TOKEN;
    let words = word_spans(text, budget);
    if words.is_empty() {
        return vec![];
    }
    let mut out = Vec::new();
    let mut first = 0;
    loop {
        let start = words[first].0;
        let mut last = first;
        while last + 1 < words.len() && words[last + 1].1 - start <= budget {
            last += 1;
        }
        out.push(text[start..words[last].1].trim().to_owned());
        if last + 1 >= words.len() {
            break;
        }
        // The next window starts at the earliest word within `overlap` characters of this
        // window's end, but always after this window's first word (progress).
        let end = words[last].1;
        let mut next = last + 1;
        while next > first + 1 && end - words[next - 1].0 <= overlap {
            next -= 1;
        }
        first = next;
    }
    out
}

/// Byte spans of the whitespace-separated words of `text`; a word longer than `max` bytes is
/// split into pieces of at most `max` bytes (at character boundaries).
fn word_spans(text: &str, max: usize) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start: Option<usize> = None;
    let push = |s: usize, e: usize, spans: &mut Vec<(usize, usize)>| {
        let mut s = s;
        while e - s > max {
            let mut cut = s + max;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            if cut == s {
                break;
            }
            spans.push((s, cut));
            s = cut;
        }
        spans.push((s, e));
    };
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if let Some(s) = start.take() {
                push(s, i, &mut spans);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        push(s, text.len(), &mut spans);
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ChunkParams = ChunkParams {
        budget_tokens: 10,
        overlap_tokens: 3,
    };

    #[test]
    fn short_text_is_one_chunk_titled_with_the_source() {
        let c = chunk_text("Doc", "hello world", false, P);
        assert_eq!(
            c,
            vec![Chunk {
                title: "Doc".into(),
                content: "hello world".into()
            }]
        );
        assert!(chunk_text("Doc", "  \n ", false, P).is_empty());
    }

    #[test]
    fn long_text_is_cut_within_budget_with_overlap() {
        let text = (0..60)
            .map(|i| format!("w{i:02}"))
            .collect::<Vec<_>>()
            .join(" ");
        let chunks = chunk_text("T", &text, false, P);
        assert!(chunks.len() > 3);
        for c in &chunks {
            assert!(c.content.len() <= 40, "{} is over budget", c.content);
        }
        // consecutive chunks share words, and every word appears somewhere
        for pair in chunks.windows(2) {
            let last_word = pair[0].content.split(' ').next_back().unwrap();
            assert!(pair[1].content.contains(last_word), "{pair:?}");
        }
        for i in 0..60 {
            let w = format!("w{i:02}");
            assert!(chunks.iter().any(|c| c.content.contains(&w)), "{w} lost");
        }
    }

    #[test]
    fn markdown_is_split_on_headings_with_the_heading_path_as_title() {
        let md = "intro text\n# Guide\nabout\n## Install\nrun it\n```\n# not a heading\n```\n## Use\ncall it\n# Other\nmore";
        let c = chunk_text("Doc", md, true, P);
        let titles: Vec<&str> = c.iter().map(|c| c.title.as_str()).collect();
        assert_eq!(
            titles,
            ["Doc", "Guide", "Guide > Install", "Guide > Use", "Other"]
        );
        assert!(c[2].content.contains("# not a heading"));
        assert_eq!(c[3].content, "call it");
    }

    #[test]
    fn a_huge_word_is_cut_and_utf8_survives() {
        let word = "é".repeat(100);
        let c = chunk_text("T", &word, false, P);
        assert!(c.len() >= 5);
        assert_eq!(
            c.iter().map(|c| c.content.chars().count()).sum::<usize>(),
            100
        );
    }

    #[test]
    fn a_megabyte_heading_gives_a_bounded_title_and_keeps_its_words_in_the_body() {
        let words = "lorem ipsum dolor ".repeat(60_000); // ~1 MB
        let md = format!("# {words}\nthe body\n## Sub {words}\nmore");
        let c = chunk_text("Doc", &md, true, P);
        assert!(!c.is_empty());
        for ch in &c {
            assert!(
                ch.title.chars().count() <= MAX_TITLE_CHARS,
                "{}",
                ch.title.len()
            );
            assert!(ch.content.len() <= 40);
        }
        assert!(c[0].title.starts_with("lorem ipsum") && c[0].title.ends_with('…'));
        assert!(c.iter().any(|ch| ch.content.contains("the body")));
        assert!(c.iter().any(|ch| ch.title.contains(" > Sub lorem")));
        assert!(
            chunk_text(&"t".repeat(5000), "x", false, P)[0]
                .title
                .chars()
                .count()
                <= MAX_TITLE_CHARS
        );
        assert_eq!(bounded("abc", 3), "abc");
        assert_eq!(bounded("abcd", 3), "ab…");
        assert_eq!(bounded("日本語です", 2), "日…");
    }

    #[test]
    fn the_hash_covers_model_title_and_content() {
        let h = content_hash("m", "t", "c");
        assert_eq!(h, content_hash("m", "t", "c"));
        assert_ne!(h, content_hash("m2", "t", "c"));
        assert_ne!(h, content_hash("m", "t2", "c"));
        assert_ne!(h, content_hash("m", "t", "c2"));
        assert_ne!(content_hash("m", "ab", "c"), content_hash("m", "a", "bc"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Markdown-ish text: headings, fences, long words, whitespace kinds, multi-byte text.
        fn markdownish() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                Just("# ".to_owned()),
                Just("###### ".to_owned()),
                Just("####### ".to_owned()),
                Just("   ## ".to_owned()),
                Just("```".to_owned()),
                Just("~~~".to_owned()),
                Just("\n".to_owned()),
                Just("\r\n".to_owned()),
                Just("\t".to_owned()),
                Just(" ".to_owned()),
                Just("\u{a0}".to_owned()),
                Just("é".to_owned()),
                Just("日本語".to_owned()),
                Just("#".repeat(300)),
                Just("x".repeat(700)),
                "[a-z]{1,12}",
                any::<String>(),
            ];
            prop::collection::vec(piece, 0..200).prop_map(|v| v.concat())
        }

        fn params() -> impl Strategy<Value = ChunkParams> {
            (1usize..64).prop_flat_map(|budget| {
                (Just(budget), 0..budget).prop_map(|(budget_tokens, overlap_tokens)| ChunkParams {
                    budget_tokens,
                    overlap_tokens,
                })
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn chunks_are_bounded_whatever_the_input(
                title in any::<String>(),
                text in markdownish(),
                markdown in any::<bool>(),
                p in params(),
            ) {
                let chunks = chunk_text(&title, &text, markdown, p);
                let budget = p.budget_tokens * CHARS_PER_TOKEN;
                let overlap = p.overlap_tokens * CHARS_PER_TOKEN;
                // at most the input (plus over-long headings copied into the body) again, plus
                // one overlap per chunk
                let body = text.len() * 2;
                prop_assert!(chunks.len() <= body + 1);
                let total: usize = chunks.iter().map(|c| c.content.len()).sum();
                prop_assert!(total <= body + chunks.len() * overlap, "{total}");
                for c in &chunks {
                    prop_assert!(c.content.len() <= budget, "{} > {budget}", c.content.len());
                    prop_assert!(!c.content.trim().is_empty());
                    prop_assert!(c.title.chars().count() <= MAX_TITLE_CHARS);
                }
            }

            #[test]
            fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096), p in params()) {
                let text = String::from_utf8_lossy(&bytes);
                for markdown in [false, true] {
                    let chunks = chunk_text("t", &text, markdown, p);
                    prop_assert!(chunks.len() <= text.len() * 2 + 1);
                }
            }
        }
    }
}
