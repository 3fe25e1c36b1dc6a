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

use sha2::{Digest, Sha256};

pub const CHARS_PER_TOKEN: usize = 4;

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
        for content in windows(&body, params) {
            out.push(Chunk {
                title: section_title.clone(),
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
            path.push((level, heading));
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
    fn the_hash_covers_model_title_and_content() {
        let h = content_hash("m", "t", "c");
        assert_eq!(h, content_hash("m", "t", "c"));
        assert_ne!(h, content_hash("m2", "t", "c"));
        assert_ne!(h, content_hash("m", "t2", "c"));
        assert_ne!(h, content_hash("m", "t", "c2"));
        assert_ne!(content_hash("m", "ab", "c"), content_hash("m", "a", "bc"));
    }
}
