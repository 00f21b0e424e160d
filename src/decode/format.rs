//! Parsing of tracefs event `format` files.

/// How a field is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// A scalar of `size` bytes.
    Scalar,
    /// A fixed array (`type name[N]`).
    Array(u32),
    /// A `__data_loc` dynamic field: a u32 holding (len << 16 | offset).
    DataLoc,
}

/// One field of an event record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatField {
    /// Field name.
    pub name: String,
    /// C type as printed.
    pub ty: String,
    /// Byte offset in the record.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
    /// Signedness.
    pub signed: bool,
    /// Storage kind.
    pub kind: FieldKind,
}

/// A parsed `format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    /// Event name.
    pub name: String,
    /// Event id.
    pub id: u32,
    /// All fields, common ones first.
    pub fields: Vec<FormatField>,
}

/// A `format` file that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("format of event {event:?}, line {line}: {what}")]
pub struct FormatError {
    /// Event name, when already seen.
    pub event: String,
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub what: String,
}

impl Format {
    /// Parses the text of a tracefs `format` file.
    pub fn parse(text: &str) -> Result<Format, FormatError> {
        let mut name = None;
        let mut id = None;
        let mut fields = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let err = |what: String| FormatError {
                event: name.clone().unwrap_or_default(),
                line: i + 1,
                what,
            };
            let t = line.trim();
            if let Some(n) = t.strip_prefix("name:") {
                name = Some(n.trim().to_string());
            } else if let Some(v) = t.strip_prefix("ID:") {
                id = Some(
                    v.trim()
                        .parse::<u32>()
                        .map_err(|_| err(format!("bad ID {:?}", v.trim())))?,
                );
            } else if t.starts_with("field:") {
                fields.push(parse_field(t).map_err(err)?);
            }
        }
        let name = name.ok_or_else(|| FormatError {
            event: String::new(),
            line: 0,
            what: "no name line".into(),
        })?;
        let id = id.ok_or_else(|| FormatError {
            event: name.clone(),
            line: 0,
            what: "no ID line".into(),
        })?;
        Ok(Format { name, id, fields })
    }

    /// The field called `name`.
    pub fn field(&self, name: &str) -> Option<&FormatField> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// Element size of the scalar kprobe/C types that appear in arrays.
fn elem_size(ty: &str) -> u32 {
    match ty.rsplit(' ').next().unwrap_or(ty) {
        "u16" | "s16" | "x16" | "short" => 2,
        "u32" | "s32" | "x32" | "int" => 4,
        "u64" | "s64" | "x64" | "long" => 8,
        _ => 1,
    }
}

fn parse_field(line: &str) -> Result<FormatField, String> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    let mut signed = false;
    for part in line.split(';') {
        let part = part.trim();
        if let Some(d) = part.strip_prefix("field:") {
            decl = Some(d.trim());
        } else if let Some(v) = part.strip_prefix("offset:") {
            offset = v.trim().parse::<u32>().ok();
        } else if let Some(v) = part.strip_prefix("size:") {
            size = v.trim().parse::<u32>().ok();
        } else if let Some(v) = part.strip_prefix("signed:") {
            signed = v.trim() == "1";
        }
    }
    let decl = decl.ok_or("no declaration")?;
    let offset = offset.ok_or_else(|| format!("no offset in {line:?}"))?;
    let size = size.ok_or_else(|| format!("no size in {line:?}"))?;
    let data_loc = decl.starts_with("__data_loc") || decl.starts_with("__rel_loc");
    // The name is the last word, possibly followed by `[N]`.
    let (ty_part, last) = decl
        .rsplit_once(' ')
        .ok_or_else(|| format!("no type in {decl:?}"))?;
    let (name, kind) = match last.split_once('[') {
        Some((n, rest)) => {
            let n_elems = rest.trim_end_matches(']');
            if data_loc {
                (n, FieldKind::DataLoc)
            } else if n_elems.is_empty() {
                // kprobe arrays print as `u8 name[]`: derive the length.
                (n, FieldKind::Array(size / elem_size(ty_part).max(1)))
            } else {
                let len = n_elems
                    .parse::<u32>()
                    .map_err(|_| format!("bad array length in {decl:?}"))?;
                (n, FieldKind::Array(len))
            }
        }
        None if data_loc => (last, FieldKind::DataLoc),
        None => (last, FieldKind::Scalar),
    };
    if name.is_empty() {
        return Err(format!("empty field name in {decl:?}"));
    }
    offset
        .checked_add(size)
        .ok_or_else(|| format!("field {name} overflows"))?;
    Ok(FormatField {
        name: name.to_string(),
        ty: ty_part.to_string(),
        offset,
        size,
        signed,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXEC: &str = "name: sched_process_exec\nID: 365\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n\
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;\n\
\tfield:char comm[16];\toffset:16;\tsize:16;\tsigned:0;\n\n\
print fmt: \"filename=%s\", __get_str(filename)\n";

    #[test]
    fn parses_scalars_arrays_and_data_loc() {
        let f = Format::parse(EXEC).unwrap();
        assert_eq!(f.name, "sched_process_exec");
        assert_eq!(f.id, 365);
        assert_eq!(f.fields.len(), 7);
        let pid = f.field("common_pid").unwrap();
        assert_eq!((pid.offset, pid.size, pid.signed), (4, 4, true));
        assert_eq!(f.field("filename").unwrap().kind, FieldKind::DataLoc);
        assert_eq!(f.field("comm").unwrap().kind, FieldKind::Array(16));
        assert_eq!(f.field("pid").unwrap().ty, "pid_t");
    }

    #[test]
    fn kprobe_arrays_without_length() {
        let text = "name: c\nID: 2000\nformat:\n\tfield:u8 saddr6[];\toffset:40;\tsize:16;\tsigned:0;\n\tfield:u32 w[];\toffset:56;\tsize:8;\tsigned:0;\n";
        let f = Format::parse(text).unwrap();
        assert_eq!(f.field("saddr6").unwrap().kind, FieldKind::Array(16));
        assert_eq!(f.field("w").unwrap().kind, FieldKind::Array(2));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Format::parse("").is_err());
        assert!(Format::parse("name: x\n").is_err());
        assert!(Format::parse("name: x\nID: y\n").is_err());
        let e = Format::parse("name: x\nID: 1\n\tfield:int a;\toffset:z;\tsize:4;\n").unwrap_err();
        assert_eq!(e.line, 3);
    }
}
