//! Which disk is a volume's main device: by its remap header, its identity, or the operator's
//! word; never guessed among several.
use std::collections::BTreeMap;

use crate::{
    blockdev::{BlockDev, BlockIo, IdentityMatch},
    dm::DeviceMapper,
    engine::{Engine, EngineError, Watch},
    metadata::{
        self,
        codec::{uuid_bytes, uuid_hex},
        header::{self, HeaderError},
    },
};

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// The main device: the one whose identity matches (of several paths to it, the one at its
    /// last path); by size only when it has no WWN or serial, and then only if exactly one
    /// disk has that size. Several are refused, never picked among: the operator names it
    /// (`given`, from `remapctl assemble NAME --main DEV`).
    pub(super) fn find_main(
        &self,
        config: &metadata::VolumeConfig,
        plain: &[BlockDev],
        spares: &BTreeMap<u32, BlockDev>,
        given: Option<&BlockDev>,
    ) -> Result<BlockDev, EngineError> {
        let is_spare = |d: &BlockDev| {
            spares
                .values()
                .any(|s| (s.major, s.minor) == (d.major, d.minor))
        };
        if let Some(g) = given {
            let refuse = |why: String| {
                Err(EngineError::Refused(format!(
                    "{} cannot be the main device of `{}`: {why}",
                    g.path.display(),
                    config.name
                )))
            };
            if is_spare(g) {
                return refuse("it is one of its spares".into());
            }
            if !plain
                .iter()
                .any(|d| (d.major, d.minor) == (g.major, g.minor))
            {
                return refuse("it carries remap metadata or is in use by a volume".into());
            }
            let id = self.k.io.identity(g).map_err(|e| {
                EngineError::Failed(format!("identifying {}: {e}", g.path.display()))
            })?;
            if let Some(why) = self.header_mismatch(config, g) {
                return refuse(why);
            }
            if config.has_header() {
                // The header remap wrote decides (a disk cloned onto a new one keeps it).
                return Ok(g.clone());
            }
            if config.main.compare(&id) == IdentityMatch::Different {
                return refuse(format!(
                    "its identity ({} bytes, serial {:?}, WWN {:?}) is not the recorded one ({} bytes, serial {:?}, WWN {:?})",
                    id.size_bytes,
                    id.serial,
                    id.wwn,
                    config.main.size_bytes,
                    config.main.serial,
                    config.main.wwn
                ));
            }
            return Ok(g.clone());
        }
        let mut same = Vec::new();
        let mut by_size = Vec::new();
        let mut headerless = Vec::new();
        for d in plain {
            if is_spare(d) {
                continue;
            }
            if let Some(why) = self.header_mismatch(config, d) {
                // Not this volume's main (another volume's, or no header where one must be);
                // a disk with the recorded WWN or serial is worth naming in the refusal.
                if self
                    .k
                    .io
                    .identity(d)
                    .is_ok_and(|id| config.main.compare(&id) == IdentityMatch::Same)
                {
                    headerless.push(format!("{}: {why}", d.path.display()));
                }
                continue;
            }
            if config.has_header() {
                // Carries this volume's header: found, whatever its size or serial says.
                same.push(d.clone());
                continue;
            }
            let Ok(id) = self.k.io.identity(d) else {
                continue;
            };
            match config.main.compare(&id) {
                IdentityMatch::Same => same.push(d.clone()),
                IdentityMatch::NeedsUuid => by_size.push(d.clone()),
                IdentityMatch::Different => {}
            }
        }
        let names = |c: &[BlockDev]| {
            c.iter()
                .map(|d| d.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if same.len() > 1 {
            // Paths to one disk (same WWN or serial): the same data whichever is taken.
            if let Some(i) = same
                .iter()
                .position(|d| d.path.to_string_lossy() == config.main_last_path)
            {
                return Ok(same.swap_remove(i));
            }
            return Err(EngineError::Refused(format!(
                "main device of `{}` is ambiguous: {} match its identity; none is at its last path {}. Name it: remapctl assemble {} --main DEV",
                config.name,
                names(&same),
                config.main_last_path,
                config.name
            )));
        }
        if let Some(d) = same.pop() {
            return Ok(d);
        }
        if by_size.len() > 1 {
            return Err(EngineError::Refused(format!(
                "main device of `{}` is ambiguous: it has no WWN or serial and {} all have its size ({} bytes); remap does not guess by path. Name it: remapctl assemble {} --main DEV",
                config.name,
                names(&by_size),
                config.main.size_bytes,
                config.name
            )));
        }
        if let Some(d) = by_size.pop() {
            return Ok(d);
        }
        if !headerless.is_empty() {
            return Err(EngineError::Refused(format!(
                "main device of `{}` not found: the disk with its identity is refused ({}); its start was overwritten or it is another volume's. Nothing assembled",
                config.name,
                headerless.join("; ")
            )));
        }
        Err(EngineError::Refused(format!(
            "main device of `{}` not found (last seen at {}, identity {:?}); attach it and assemble again",
            config.name, config.main_last_path, config.main
        )))
    }

    /// Why `d` cannot be the main of `config` by its header: a volume with a header needs its
    /// own (same volume and member UUID, same data offset); a volume without one never takes a
    /// disk that carries a header (it is some volume's main, its data at an offset).
    fn header_mismatch(&self, config: &metadata::VolumeConfig, d: &BlockDev) -> Option<String> {
        let found = header::read(&self.k.io, d);
        if !config.has_header() {
            return match found {
                Err(HeaderError::NoMagic) | Err(HeaderError::Io { .. }) => None,
                Ok(h) => Some(format!(
                    "it carries the remap header of volume `{}`",
                    h.volume_name
                )),
                Err(e) => Some(format!("it carries a damaged remap header ({e})")),
            };
        }
        let h = match found {
            Ok(h) => h,
            Err(HeaderError::NoMagic) => return Some("it carries no remap header".into()),
            Err(e) => return Some(format!("its remap header cannot be used: {e}")),
        };
        let member = config.main_uuid.as_deref().map(uuid_bytes);
        if h.volume_uuid != uuid_bytes(&config.uuid) {
            return Some(format!(
                "it carries the remap header of another volume (`{}`, {})",
                h.volume_name,
                uuid_hex(&h.volume_uuid)
            ));
        }
        if Some(h.member_uuid) != member || h.data_offset != config.data_offset {
            return Some(format!(
                "its remap header names `{}` but disagrees with the metadata (member {}, data offset {} sectors)",
                h.volume_name,
                uuid_hex(&h.member_uuid),
                h.data_offset
            ));
        }
        None
    }
}
