//! Pure helpers shared by [`super::Dm`] and the simulation: the checks the kernel makes
//! before it looks at a target, and tables as `dmsetup table` text. Kept apart from both so the
//! simulation refuses exactly what the real thing refuses.
use super::{DmError, DmLine, DmOp, NAME_LEN, TYPE_LEN, UUID_LEN};

/// Refuses names the kernel would refuse (or that would not fit its ioctl header).
pub fn check_name(op: DmOp, name: &str) -> Result<(), DmError> {
    let bad = |reason: &str| {
        Err(DmError::InvalidName {
            op,
            name: name.to_owned(),
            what: "name",
            reason: reason.to_owned(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() >= NAME_LEN {
        return bad(&format!("longer than {} bytes", NAME_LEN - 1));
    }
    // The kernel refuses '/' (it would be a path below /dev/mapper).
    if name.contains('/') || name == "." || name == ".." {
        return bad("contains '/' or is . or ..");
    }
    if name.contains('\0') {
        return bad("contains a NUL byte");
    }
    Ok(())
}

pub(super) fn check_uuid(op: DmOp, name: &str, uuid: &str) -> Result<(), DmError> {
    if uuid.len() >= UUID_LEN || uuid.contains('\0') {
        return Err(DmError::InvalidName {
            op,
            name: name.to_owned(),
            what: "uuid",
            reason: format!("{uuid:?} is longer than {} bytes or has NUL", UUID_LEN - 1),
        });
    }
    Ok(())
}

/// Checks the rules the kernel applies to every table before it looks at the targets: at
/// least one line, lines in order from sector 0 without gaps or overlaps, no empty line.
/// Returns the device size in sectors.
pub fn validate_table(op: DmOp, name: &str, table: &[DmLine]) -> Result<u64, DmError> {
    let bad = |reason: String| {
        Err(DmError::InvalidTable {
            op,
            name: name.to_owned(),
            reason,
        })
    };
    if table.is_empty() {
        return bad("no targets".into());
    }
    let mut pos = 0u64;
    for (i, (start, len, ty, params)) in table.iter().enumerate() {
        if *start != pos {
            return bad(format!(
                "line {i} starts at sector {start}, expected {pos} (gap or overlap)"
            ));
        }
        if *len == 0 {
            return bad(format!("line {i} has length 0"));
        }
        // The devicemapper crate asserts on over-long type names; refuse them here instead.
        if ty.is_empty() || ty.len() >= TYPE_LEN || !ty.bytes().all(|b| b.is_ascii_graphic()) {
            return bad(format!("line {i}: invalid target type {ty:?}"));
        }
        if params.contains('\0') {
            return bad(format!("line {i}: parameters contain a NUL byte"));
        }
        pos = match start.checked_add(*len) {
            Some(end) => end,
            None => return bad(format!("line {i} ends past 2^64 sectors")),
        };
    }
    Ok(pos)
}

/// Renders a table the way `dmsetup table` prints it, one line per target.
pub fn format_table(table: &[DmLine]) -> String {
    let mut out = String::new();
    for (start, len, ty, params) in table {
        out.push_str(&format!("{start} {len} {ty}"));
        if !params.is_empty() {
            out.push(' ');
            out.push_str(params);
        }
        out.push('\n');
    }
    out
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("table line {line}: {reason}")]
pub struct ParseTableError {
    /// 1-based.
    pub line: usize,
    pub reason: String,
}

/// Parses `dmsetup table` output (or [`format_table`]'s) back into lines. Blank lines are
/// skipped; parameters are kept as they are apart from surrounding whitespace.
pub fn parse_table(text: &str) -> Result<Vec<DmLine>, ParseTableError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let err = |reason: &str| ParseTableError {
            line: i + 1,
            reason: reason.to_owned(),
        };
        let mut rest = line;
        let mut word = || {
            let w = rest.split(char::is_whitespace).next().unwrap_or("");
            rest = rest[w.len()..].trim_start();
            (!w.is_empty()).then_some(w)
        };
        let mut number = |what: &str| -> Result<u64, ParseTableError> {
            word()
                .ok_or_else(|| err(&format!("missing {what}")))?
                .parse()
                .map_err(|_| err(&format!("{what} is not a number")))
        };
        let start = number("start")?;
        let len = number("length")?;
        let ty = word().ok_or_else(|| err("missing target type"))?;
        let params = rest.trim_end();
        out.push((start, len, ty.to_owned(), params.to_owned()));
    }
    Ok(out)
}

/// A line in the form the kernel reports it back: parameters separated by single spaces and
/// dm-flakey's optional feature count made explicit (the kernel always prints it).
pub fn canonical_line(line: &DmLine) -> DmLine {
    let (start, len, ty, params) = line;
    let mut words: Vec<&str> = params.split_whitespace().collect();
    if ty == "flakey" && words.len() == 4 {
        words.push("0");
    }
    (*start, *len, ty.clone(), words.join(" "))
}

/// Whether the kernel's report of a table (`live`) is the table that was loaded (`loaded`).
/// Devices must be named `major:minor` in `loaded`: the kernel reports them that way.
pub fn same_table(loaded: &[DmLine], live: &[DmLine]) -> bool {
    loaded.len() == live.len()
        && loaded
            .iter()
            .zip(live)
            .all(|(a, b)| canonical_line(a) == canonical_line(b))
}
