//! The offsets the completion program reads from the kernel's own structures (`struct
//! request`, its queue and disk), found in the running kernel's BTF: Rust eBPF has no CO-RE
//! relocations, so user space resolves them at load time, as it does the tracepoint formats.
use btf_rs::{Btf, Type};
use remap_common::ReqLayout;

/// Where the kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The byte offset of `field` in `struct strukt`, with the size the program reads checked
/// against the field's own (a field that changed type must not be read as the old one).
fn offset(btf: &Btf, strukt: &str, field: &str, size: usize) -> Result<u32, String> {
    let types = btf
        .resolve_types_by_name(strukt)
        .map_err(|e| format!("struct {strukt}: {e}"))?;
    let s = types
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| format!("no struct {strukt} in the kernel's BTF"))?;
    for m in &s.members {
        if btf.resolve_name(m).ok().as_deref() != Some(field) {
            continue;
        }
        if m.bitfield_size().is_some_and(|b| b != 0) {
            return Err(format!("{strukt}.{field} is a bit field"));
        }
        let bits = m.bit_offset();
        if bits % 8 != 0 {
            return Err(format!("{strukt}.{field} is not byte-aligned"));
        }
        let have = size_of_type(btf, btf.resolve_chained_type(m).ok())
            .ok_or_else(|| format!("{strukt}.{field}: size unknown"))?;
        if have != size {
            return Err(format!(
                "{strukt}.{field} is {have} bytes here, {size} expected"
            ));
        }
        return Ok(bits / 8);
    }
    Err(format!("struct {strukt} has no field {field}"))
}

/// The size of a member's type, through typedefs and qualifiers; pointers are 8 bytes.
fn size_of_type(btf: &Btf, mut t: Option<Type>) -> Option<usize> {
    for _ in 0..16 {
        match t? {
            Type::Int(i) => return Some(i.size()),
            Type::Enum(e) => return Some(e.size()),
            Type::Ptr(_) => return Some(8),
            Type::Typedef(x) => t = btf.resolve_chained_type(&x).ok(),
            Type::Volatile(x) => t = btf.resolve_chained_type(&x).ok(),
            Type::Const(x) => t = btf.resolve_chained_type(&x).ok(),
            Type::TypeTag(x) => t = btf.resolve_chained_type(&x).ok(),
            _ => return None,
        }
    }
    None
}

/// The request layout of the kernel whose BTF this is.
pub fn req_layout(btf: &Btf) -> Result<ReqLayout, String> {
    Ok(ReqLayout {
        rq_q: offset(btf, "request", "q", 8)?,
        rq_sector: offset(btf, "request", "__sector", 8)?,
        rq_data_len: offset(btf, "request", "__data_len", 4)?,
        rq_cmd_flags: offset(btf, "request", "cmd_flags", 4)?,
        rq_start_time_ns: offset(btf, "request", "start_time_ns", 8)?,
        q_disk: offset(btf, "request_queue", "disk", 8)?,
        disk_major: offset(btf, "gendisk", "major", 4)?,
        disk_first_minor: offset(btf, "gendisk", "first_minor", 4)?,
        valid: 1,
    })
}

/// The running kernel's request layout, or why there is none.
pub fn running_req_layout() -> Result<ReqLayout, String> {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| format!("{VMLINUX_BTF}: {e}"))?;
    req_layout(&btf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On this machine's own kernel (the build machines publish BTF): every field found.
    #[test]
    fn the_running_kernels_request_layout_resolves() {
        let l = running_req_layout().unwrap();
        assert_eq!(l.valid, 1);
        // The sector and the length sit near each other at the start of the request.
        assert!(l.rq_data_len.abs_diff(l.rq_sector) <= 16, "{l:?}");
        assert!(
            l.rq_q < l.rq_sector && l.rq_start_time_ns > l.rq_sector,
            "{l:?}"
        );
        assert_eq!(l.disk_first_minor.abs_diff(l.disk_major), 4, "{l:?}");
    }
}
