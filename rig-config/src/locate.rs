//! From byte spans and key paths to `line:column`, using the span-keeping
//! parse of `toml_edit`.

use std::ops::Range;

use toml_edit::{Array, ArrayOfTables, ImDocument, InlineTable, Item, Table, Value};

use crate::validate::{KeyPath, Segment};

/// 1-based line and column (in characters) of byte `offset` in `text`.
/// Offsets past the end or inside a character are clamped; never panics.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let bytes = text.as_bytes();
    let before = bytes.get(..offset).unwrap_or(bytes);
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before
        .get(line_start..)
        .map_or(0, |rest| String::from_utf8_lossy(rest).chars().count())
        + 1;
    (line, column)
}

/// A node of the parsed document.
#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a Table),
    Inline(&'a InlineTable),
    Tables(&'a ArrayOfTables),
    Array(&'a Array),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn from_item(item: &'a Item) -> Option<Self> {
        match item {
            Item::None => None,
            Item::Table(t) => Some(Node::Table(t)),
            Item::ArrayOfTables(a) => Some(Node::Tables(a)),
            Item::Value(v) => Some(Node::from_value(v)),
        }
    }

    fn from_value(v: &'a Value) -> Self {
        match v {
            Value::InlineTable(t) => Node::Inline(t),
            Value::Array(a) => Node::Array(a),
            other => Node::Value(other),
        }
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Table(t) => t.span(),
            Node::Inline(t) => t.span(),
            Node::Tables(a) => a.span(),
            Node::Array(a) => a.span(),
            Node::Value(v) => v.span(),
        }
    }

    /// True for values written in place (`key = value`), false for tables
    /// with a header.
    fn is_value(self) -> bool {
        matches!(self, Node::Inline(_) | Node::Array(_) | Node::Value(_))
    }

    /// The child at `seg`, with the span of its key if it has one.
    fn child(self, seg: &Segment) -> Option<(Option<Range<usize>>, Node<'a>)> {
        match (self, seg) {
            (Node::Table(t), Segment::Key(k)) => {
                let (key, item) = t.get_key_value(k)?;
                Some((key.span(), Node::from_item(item)?))
            }
            (Node::Inline(t), Segment::Key(k)) => {
                let (key, value) = t.get_key_value(k)?;
                Some((key.span(), Node::from_item(value)?))
            }
            (Node::Tables(a), Segment::Index(i)) => Some((None, Node::Table(a.get(*i)?))),
            (Node::Array(a), Segment::Index(i)) => Some((None, Node::from_value(a.get(*i)?))),
            _ => None,
        }
    }

    /// Every child, with its path segment and key span.
    fn children(self) -> Vec<(Segment, Option<Range<usize>>, Node<'a>)> {
        match self {
            Node::Table(t) => t
                .iter()
                .filter_map(|(k, _)| {
                    let (key, item) = t.get_key_value(k)?;
                    Some((
                        Segment::Key(k.to_owned()),
                        key.span(),
                        Node::from_item(item)?,
                    ))
                })
                .collect(),
            Node::Inline(t) => t
                .iter()
                .filter_map(|(k, _)| {
                    let (key, value) = t.get_key_value(k)?;
                    Some((
                        Segment::Key(k.to_owned()),
                        key.span(),
                        Node::from_item(value)?,
                    ))
                })
                .collect(),
            Node::Tables(a) => a
                .iter()
                .enumerate()
                .map(|(i, t)| (Segment::Index(i), None, Node::Table(t)))
                .collect(),
            Node::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (Segment::Index(i), None, Node::from_value(v)))
                .collect(),
            Node::Value(_) => Vec::new(),
        }
    }
}

/// Where a key path points in the document.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Located {
    /// Byte offset to report.
    pub offset: usize,
    /// The value's source text, when the key is set to a plain value.
    pub raw_value: Option<String>,
    /// Whether the file sets the key (false: a default was used).
    pub present: bool,
}

/// Finds `path` in the document: the value (or table header) if the file sets
/// it, else the header of the nearest enclosing table written in the file,
/// else the start of the file.
pub(crate) fn locate(doc: &ImDocument<&str>, path: &KeyPath) -> Located {
    let mut node = Node::Table(doc.as_table());
    let mut offset = 0;
    for seg in &path.0 {
        match node.child(seg) {
            Some((key_span, child)) => {
                node = child;
                if let Some(span) = child.span().or(key_span) {
                    offset = span.start;
                }
            }
            None => {
                return Located {
                    offset,
                    raw_value: None,
                    present: false,
                }
            }
        }
    }
    let raw_value = match node {
        n if n.is_value() => n
            .span()
            .and_then(|s| doc.raw().get(s))
            .map(|s| s.trim().to_owned()),
        _ => None,
    };
    Located {
        offset,
        raw_value,
        present: true,
    }
}

/// How deep [`find_span`] looks: well past the schema's depth, and bounded so
/// a pathological file cannot exhaust the stack.
const MAX_WALK_DEPTH: usize = 16;

/// What is at a byte span the deserializer complained about.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Found {
    pub path: KeyPath,
    /// True if the span is the key itself (unknown key), false if the value.
    pub is_key: bool,
    pub raw_value: Option<String>,
}

/// Finds the key or value whose span is exactly `span`, or failing that the
/// deepest key or value that contains its start.
pub(crate) fn find_span(doc: &ImDocument<&str>, span: &Range<usize>) -> Option<Found> {
    let mut exact = None;
    let mut containing: Option<(usize, Found)> = None;
    walk(
        doc,
        Node::Table(doc.as_table()),
        &mut KeyPath::default(),
        span,
        &mut exact,
        &mut containing,
    );
    exact.or(containing.map(|(_, f)| f))
}

fn walk(
    doc: &ImDocument<&str>,
    node: Node<'_>,
    path: &mut KeyPath,
    target: &Range<usize>,
    exact: &mut Option<Found>,
    containing: &mut Option<(usize, Found)>,
) {
    for (seg, key_span, child) in node.children() {
        if exact.is_some() {
            return;
        }
        path.0.push(seg);
        let raw_value = if child.is_value() {
            child
                .span()
                .and_then(|s| doc.raw().get(s))
                .map(|s| s.trim().to_owned())
        } else {
            None
        };
        let found = |is_key| Found {
            path: path.clone(),
            is_key,
            raw_value: raw_value.clone(),
        };
        if key_span.as_ref() == Some(target) {
            *exact = Some(found(true));
        } else if child.is_value() && child.span().as_ref() == Some(target) {
            *exact = Some(found(false));
        } else {
            let value_span = if child.is_value() { child.span() } else { None };
            for (s, is_key) in [(key_span.clone(), true), (value_span, false)] {
                let Some(s) = s else { continue };
                if s.contains(&target.start)
                    && containing
                        .as_ref()
                        .map_or(true, |(d, _)| path.0.len() >= *d)
                {
                    *containing = Some((path.0.len(), found(is_key)));
                }
            }
            // The schema is 4 levels deep; deeper keys are already unknown.
            if path.0.len() < MAX_WALK_DEPTH {
                walk(doc, child, path, target, exact, containing);
            }
        }
        path.0.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 4), (1, 5));
        assert_eq!(line_col(text, 6), (2, 1));
        // "bé = " is 6 bytes, 5 characters
        assert_eq!(line_col(text, 12), (2, 6));
        // inside a character and past the end: clamped, no panic
        assert_eq!(line_col(text, 8).0, 2);
        assert_eq!(line_col(text, 1000), (3, 1));
    }
}
