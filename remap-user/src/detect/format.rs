//! Parser for `/sys/kernel/tracing/events/block/<event>/format`.
//!
//! Rust eBPF has no CO-RE field relocations, and the layout of `block_rq_error` moved between
//! kernels (`rwbs` at 32 on 6.1, at 34 on 6.12), so the offsets are read from the running
//! kernel and passed to the program.
use remap_common::Layout;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("tracepoint format has no field `{0}`")]
    MissingField(&'static str),
    #[error("tracepoint field `{field}` has size {size}, expected {expected}")]
    WrongSize {
        field: &'static str,
        size: u32,
        expected: &'static str,
    },
    #[error("malformed tracepoint format line: {0}")]
    Malformed(String),
}

/// One `field:` line of a format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub ty: String,
    pub offset: u32,
    pub size: u32,
}

/// The fields of a format file, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracepointFormat {
    pub fields: Vec<Field>,
}

impl TracepointFormat {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The offsets the detector needs, with their sizes checked against what it reads.
    pub fn block_rq_layout(&self) -> Result<Layout, FormatError> {
        let base = self.block_rq_issue_layout()?;
        Ok(Layout {
            error: self.offset("error", |s| s == 4, "4")?,
            ..base
        })
    }

    /// The same for `block_rq_issue`, which has no `error` (left 0: the issue program never
    /// reads it).
    pub fn block_rq_issue_layout(&self) -> Result<Layout, FormatError> {
        Ok(Layout {
            dev: self.offset("dev", |s| s == 4, "4")?,
            sector: self.offset("sector", |s| s == 8, "8")?,
            nr_sector: self.offset("nr_sector", |s| s == 4, "4")?,
            error: 0,
            rwbs: self.offset("rwbs", |s| s >= 2, "at least 2")?,
            valid: 1,
        })
    }

    fn offset(
        &self,
        name: &'static str,
        ok: fn(u32) -> bool,
        expected: &'static str,
    ) -> Result<u32, FormatError> {
        let f = self.field(name).ok_or(FormatError::MissingField(name))?;
        if ok(f.size) {
            Ok(f.offset)
        } else {
            Err(FormatError::WrongSize {
                field: name,
                size: f.size,
                expected,
            })
        }
    }
}

/// Parses the text of a tracepoint format file.
pub fn parse_format(text: &str) -> Result<TracepointFormat, FormatError> {
    let mut fields = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let malformed = || FormatError::Malformed(line.to_owned());
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for (i, part) in rest.split(';').map(str::trim).enumerate() {
            if i == 0 {
                decl = Some(part);
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = Some(v.trim().parse::<u32>().map_err(|_| malformed())?);
            } else if let Some(v) = part.strip_prefix("size:") {
                size = Some(v.trim().parse::<u32>().map_err(|_| malformed())?);
            }
        }
        let (decl, offset, size) = match (decl, offset, size) {
            (Some(d), Some(o), Some(s)) => (d, o, s),
            _ => return Err(malformed()),
        };
        // `char rwbs[10]` → name `rwbs`, type `char[10]`; `__data_loc char[] cmd` → `cmd`.
        let (ty, name) = decl
            .rsplit_once(char::is_whitespace)
            .ok_or_else(malformed)?;
        let (name, dims) = match name.find('[') {
            Some(i) => (&name[..i], &name[i..]),
            None => (name, ""),
        };
        if name.is_empty() {
            return Err(malformed());
        }
        fields.push(Field {
            name: name.to_owned(),
            ty: format!("{}{dims}", ty.trim()),
            offset,
            size,
        });
    }
    Ok(TracepointFormat { fields })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `block_rq_error` on Debian's 6.1 kernel (KERNEL-FACTS: rwbs@32, char[8]).
    const V6_1: &str = "name: block_rq_error
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:char rwbs[8];\toffset:32;\tsize:8;\tsigned:1;
\tfield:__data_loc char[] cmd;\toffset:40;\tsize:4;\tsigned:1;

print fmt: \"%d,%d %s (%s) %llu + %u [%d]\", ...
";

    /// `block_rq_error` on 6.12 and 6.18 (ioprio@32, rwbs@34 char[10], cmd@44).
    const V6_12: &str = "name: block_rq_error
ID: 2106
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:44;\tsize:4;\tsigned:0;

print fmt: \"%d,%d %s (%s) %llu + %u %s,%u,%u [%d]\", ...
";

    #[test]
    fn layout_6_1() {
        let l = parse_format(V6_1).unwrap().block_rq_layout().unwrap();
        assert_eq!(
            l,
            Layout {
                dev: 8,
                sector: 16,
                nr_sector: 24,
                error: 28,
                rwbs: 32,
                valid: 1
            }
        );
    }

    #[test]
    fn layout_6_12_and_6_18() {
        let f = parse_format(V6_12).unwrap();
        assert_eq!(f.block_rq_layout().unwrap().rwbs, 34);
        assert_eq!(f.field("ioprio").unwrap().offset, 32);
        assert_eq!(f.field("rwbs").unwrap().ty, "char[10]");
        assert_eq!(f.field("cmd").unwrap().ty, "__data_loc char[]");
    }

    #[test]
    fn common_fields_are_kept_in_order() {
        let f = parse_format(V6_12).unwrap();
        let names: Vec<_> = f.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names[..5],
            [
                "common_type",
                "common_flags",
                "common_preempt_count",
                "common_pid",
                "dev"
            ]
        );
    }

    #[test]
    fn missing_field_is_named() {
        let text = V6_12.replace("field:int error;", "field:int err;");
        let err = parse_format(&text).unwrap().block_rq_layout().unwrap_err();
        assert_eq!(err, FormatError::MissingField("error"));
    }

    #[test]
    fn wrong_size_is_refused() {
        let text = V6_12.replace("offset:16;\tsize:8;", "offset:16;\tsize:4;");
        let err = parse_format(&text).unwrap().block_rq_layout().unwrap_err();
        assert!(matches!(
            err,
            FormatError::WrongSize {
                field: "sector",
                size: 4,
                ..
            }
        ));
    }

    #[test]
    fn garbage_offset_is_malformed() {
        let text = V6_12.replace("offset:24;", "offset:x;");
        assert!(matches!(
            parse_format(&text),
            Err(FormatError::Malformed(_))
        ));
    }

    /// block_rq_issue on 6.18 (the host): no `error`, and `ioprio` before `rwbs`.
    const ISSUE_6_18: &str = "name: block_rq_issue
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:unsigned int bytes;\toffset:28;\tsize:4;\tsigned:0;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:char comm[16];\toffset:44;\tsize:16;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:60;\tsize:4;\tsigned:0;
";

    #[test]
    fn issue_layout_needs_no_error_field() {
        let f = parse_format(ISSUE_6_18).unwrap();
        let l = f.block_rq_issue_layout().unwrap();
        assert_eq!(
            (l.dev, l.sector, l.nr_sector, l.rwbs, l.valid),
            (8, 16, 24, 34, 1)
        );
        assert_eq!(f.block_rq_layout(), Err(FormatError::MissingField("error")));
    }

    #[test]
    fn empty_text_has_no_fields() {
        let f = parse_format("").unwrap();
        assert_eq!(f.block_rq_layout(), Err(FormatError::MissingField("dev")));
    }
}
