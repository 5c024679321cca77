//! A volume made and stopped: the checks before anything is written (names, devices free and
//! not overlapping, what the main holds), then the header, metadata and devices in crash-safe order.
use std::{collections::BTreeMap, path::Path};

use remap_common::{RemapKey, kernel_dev};

use super::{Engine, EngineError, Kernel, Result, Volume, Watch, failed, views};
use crate::{
    allocate::{Policy, Pool},
    blockdev::{BlockDev, BlockIo, DevIdentity, IdentityMatch},
    dm::DeviceMapper,
    metadata::{
        self, Journal, Layout, SpareRecord, VolumeConfig, codec::uuid_bytes, crash_point, header,
    },
    registry::same,
    switch::{group_name, region_name},
    table::RemapTable,
    volume::{Geometry, PendingMode, SECTOR, Sector, UnreadablePolicy},
};

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// Opens a device for a new role: it must exist, be a block device, and be free.
    pub(crate) fn claimable(&self, path: &Path, role: &str) -> Result<BlockDev> {
        let dev = self
            .k
            .io
            .open(path)
            .map_err(|e| EngineError::Invalid(format!("{role}: {e}")))?;
        if let Some(v) = self.volumes.values().find(|v| v.main_or_spare(&dev)) {
            return Err(EngineError::Refused(format!(
                "{role} {} is already part of volume `{}`",
                path.display(),
                v.config.name
            )));
        }
        for v in self.volumes.values() {
            for member in v.members() {
                if let Some(why) = self.overlap(&dev, member) {
                    return Err(EngineError::Refused(format!(
                        "{role} {} overlaps {} of volume `{}`: {why}",
                        path.display(),
                        member.path.display(),
                        v.config.name
                    )));
                }
            }
        }
        match metadata::read_device_with(&self.k.io, &dev, |_| false) {
            Err(metadata::MetaError::NoMagic) => {}
            Ok(m) => {
                return Err(EngineError::Refused(format!(
                    "{role} {} holds the metadata of volume `{}` (generation {}); assemble that volume, or wipe the device if it is no longer needed",
                    path.display(),
                    m.config.name,
                    m.generation
                )));
            }
            Err(metadata::MetaError::Io { .. }) => {}
            Err(e) => {
                return Err(EngineError::Refused(format!(
                    "{role} {} holds remap metadata that cannot be read ({e}); it may belong to a volume: wipe it only if you are sure",
                    path.display()
                )));
            }
        }
        if let Some(model) = self.k.io.zoned(&dev).filter(|z| z == "host-managed") {
            return Err(EngineError::Invalid(format!(
                "{role} {} is a zoned device ({model}): it takes writes only in sequence within each zone, and remap copies and writes chunks anywhere; use a conventional disk",
                path.display()
            )));
        }
        if let Some(why) = self.k.io.in_use(&dev) {
            return Err(EngineError::Refused(format!(
                "{role} {} is in use ({why}); unmount or release it first",
                path.display()
            )));
        }
        // A spare is written over from its first sector (metadata, then extents): what it
        // holds is named before anything is lost. (The main is checked by create, which knows
        // whether its data is to be kept in place.)
        if role != "main device"
            && let Some(what) = self.holds(&dev)?
        {
            return Err(EngineError::Refused(format!(
                "{role} {} holds {what}: remap would overwrite it. If its data is no longer needed, wipe it first (wipefs -a {})",
                path.display(),
                path.display()
            )));
        }
        Ok(dev)
    }

    /// Why `a` and `b` cannot both be members: they share sectors of a device underneath (a
    /// partition and its disk, a loop or device-mapper device over the other, a remap volume
    /// over its own members) or are two paths to one disk (the same WWN or serial). Disjoint
    /// slices of one disk (two partitions, two linear devices) share nothing and may be both.
    pub(crate) fn overlap(&self, a: &BlockDev, b: &BlockDev) -> Option<String> {
        if same(a, b) {
            return Some("they are the same device".into());
        }
        let (sa, sb) = (self.k.io.stack(a), self.k.io.stack(b));
        if let Some(s) = sa.iter().find(|s| sb.iter().any(|t| s.meets(t))) {
            let (maj, min) = s.dev;
            return Some(format!("both use the same sectors of device {maj}:{min}"));
        }
        if let (Ok(ia), Ok(ib)) = (self.k.io.identity(a), self.k.io.identity(b))
            && ia.compare(&ib) == IdentityMatch::Same
        {
            return Some("they are two paths to one disk (same WWN or serial number)".into());
        }
        None
    }

    /// What the main holds now, against what create is about to do with it: a volume's
    /// header is never overwritten, and without `--in-place` nothing that looks like data
    /// is hidden behind a new header.
    pub(crate) fn check_main_contents(&self, main: &BlockDev, in_place: bool) -> Result<()> {
        let shown = main.path.display();
        match header::read(&self.k.io, main) {
            Err(header::HeaderError::NoMagic) => {}
            Err(header::HeaderError::Io { error, .. }) => {
                return Err(EngineError::Failed(format!(
                    "reading the start of {shown}: {error}"
                )));
            }
            found => {
                let whose = found.map_or_else(
                    |e| format!("a remap header that cannot be read ({e})"),
                    |h| format!("the remap header of volume `{}`", h.volume_name),
                );
                let mib = self.k.io.size_bytes(main).map_or(0, |b| b >> 20);
                return Err(EngineError::Refused(format!(
                    "main device {shown} carries {whose}: assemble that volume (remapctl assemble); if it is gone for good, clear both copies of the header first: dd if=/dev/zero of={shown} bs=1M count=1 oflag=direct; dd if=/dev/zero of={shown} bs=1M seek={} count=1 oflag=direct",
                    mib.saturating_sub(1)
                )));
            }
        }
        if in_place {
            return Ok(());
        }
        if let Some(what) = self.holds(main)? {
            return Err(EngineError::Refused(format!(
                "main device {shown} holds {what}: a volume puts remap's header where it starts. To keep its data and protect it as it is, create with --in-place (the volume starts at the disk's first sector); to use the disk empty, wipe it first (wipefs -a {shown})"
            )));
        }
        Ok(())
    }

    /// The filesystem, volume manager or partition table `dev` starts with, if any.
    pub(crate) fn holds(&self, dev: &BlockDev) -> Result<Option<&'static str>> {
        let shown = dev.path.display();
        let size = self
            .k
            .io
            .size_bytes(dev)
            .map_err(|e| failed(format!("size of {shown}"))(e.to_string()))?;
        let len = (crate::signature::PROBE_BYTES as u64).min(size / 4096 * 4096) as usize;
        let mut start = vec![0u8; len];
        self.k
            .io
            .read_at(dev, 0, &mut start)
            .map_err(|e| failed(format!("reading the start of {shown}"))(e.to_string()))?;
        Ok(crate::signature::probe(&start))
    }

    /// Writes the main's header (over a zeroed front and back room) for `vol`.
    pub(crate) fn write_header(&self, vol: &Volume, device_sectors: Sector) -> Result<()> {
        let h = header::MemberHeader {
            volume_uuid: uuid_bytes(&vol.config.uuid),
            member_uuid: uuid_bytes(vol.config.main_uuid.as_deref().unwrap_or_default()),
            volume_name: vol.config.name.clone(),
            data_offset: vol.config.data_offset,
            data_sectors: vol.geo().size,
            device_sectors,
        };
        header::write(&self.k.io, &vol.main, &h).map_err(|e| EngineError::Failed(e.to_string()))
    }

    pub(crate) fn identity(&self, dev: &BlockDev) -> Result<DevIdentity> {
        self.k
            .io
            .identity(dev)
            .map_err(|e| EngineError::Failed(format!("identifying {}: {e}", dev.path.display())))
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "mirrors the create request one to one"
    )]
    pub fn create(
        &mut self,
        name: &str,
        main_path: &Path,
        spare_paths: &[std::path::PathBuf],
        chunk_bytes: u64,
        region_bytes: u64,
        policy: Policy,
        in_place: bool,
        unreadable: UnreadablePolicy,
    ) -> Result<views::VolumeStatus> {
        validate_name(name)?;
        if self.volumes.contains_key(name) {
            return Err(EngineError::Refused(format!(
                "volume `{name}` already exists"
            )));
        }
        // The names of its region and group devices too: they are made later, at a region's
        // first remap or cut, and must be free then.
        let region_prefix = region_name(name, 0);
        let region_prefix = &region_prefix[..region_prefix.len() - 5];
        if let Some(d) = self
            .k
            .dm
            .list(name)
            .map_err(|e| failed("listing device-mapper devices")(e.to_string()))?
            .iter()
            .find(|d| d.name == name || d.name.starts_with(region_prefix))
        {
            return Err(EngineError::Refused(format!(
                "a device-mapper device named `{}` already exists",
                d.name
            )));
        }
        if spare_paths.is_empty() {
            return Err(EngineError::Invalid(
                "a volume needs at least one spare device (--spare DEV)".into(),
            ));
        }
        let main = self.claimable(main_path, "main device")?;
        let mut spares = BTreeMap::new();
        for (i, p) in spare_paths.iter().enumerate() {
            let s = self.claimable(p, "spare")?;
            if same(&s, &main) {
                return Err(EngineError::Invalid(format!(
                    "spare {} is the main device itself",
                    p.display()
                )));
            }
            if spares.values().any(|o| same(o, &s)) {
                return Err(EngineError::Invalid(format!(
                    "spare {} is given twice",
                    p.display()
                )));
            }
            if let Some(why) = self.overlap(&s, &main) {
                return Err(EngineError::Invalid(format!(
                    "spare {} overlaps the main device {}: {why}",
                    p.display(),
                    main_path.display()
                )));
            }
            if let Some((o, why)) = spares
                .values()
                .find_map(|o| self.overlap(&s, o).map(|w| (o, w)))
            {
                return Err(EngineError::Invalid(format!(
                    "spare {} overlaps spare {}: {why}",
                    p.display(),
                    o.path.display()
                )));
            }
            spares.insert(i as u32, s);
        }
        let main_size = self
            .k
            .io
            .size_bytes(&main)
            .map_err(|e| failed(format!("size of {}", main_path.display()))(e.to_string()))?;
        // Bad blocks are located, and kept pending, in the unit the medium fails in: on a 512e
        // disk one bad 4 KiB physical sector fails all eight of its logical sectors.
        let block =
            self.k.io.physical_block_size(&main).map_err(|e| {
                failed(format!("block size of {}", main_path.display()))(e.to_string())
            })?;
        // The header's room, unless the data stays where it is.
        let (front, tail) = if in_place {
            (0, 0)
        } else {
            header::reserved((chunk_bytes / SECTOR).max(1))
        };
        self.check_main_contents(&main, in_place)?;
        let data_bytes = main_size.saturating_sub((front + tail) * SECTOR);
        let geometry = Geometry::new(data_bytes, block, chunk_bytes, region_bytes)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        if region_bytes < crate::volume::MIN_REGION_BYTES {
            return Err(EngineError::Invalid(format!(
                "--region-size {region_bytes} is below the minimum of {} bytes (1 MiB): each region is a device-mapper device",
                crate::volume::MIN_REGION_BYTES
            )));
        }
        if geometry.regions() > crate::volume::MAX_REGIONS {
            return Err(EngineError::Invalid(format!(
                "--region-size {region_bytes} cuts {} into {} regions, more than {}: choose a larger region size",
                main_path.display(),
                geometry.regions(),
                crate::volume::MAX_REGIONS
            )));
        }
        let mut sizes = BTreeMap::new();
        for (slot, s) in &spares {
            let size = self
                .k
                .io
                .size_bytes(s)
                .map_err(|e| failed(format!("size of {}", s.path.display()))(e.to_string()))?;
            sizes.insert(*slot, size);
        }
        let layout = Layout::for_spare(sizes.values().copied().min().unwrap_or(0));
        let area = layout.area_bytes / SECTOR;
        let mut pool = Pool::new(geometry.chunk, policy);
        let mut records = Vec::new();
        for (slot, s) in &spares {
            let size = sizes[slot] / SECTOR;
            pool.add(*slot, size, area)
                .map_err(|e| EngineError::Invalid(format!("spare {}: {e}", s.path.display())))?;
            records.push(SpareRecord {
                slot: *slot,
                identity: self.identity(s)?,
                uuid: new_uuid(),
                size_sectors: size,
                last_path: s.path.display().to_string(),
                hot: false,
                draining: false,
                meta_failed: false,
            });
        }
        let pending_mode = self.k.pending_mode(&main, unreadable)?;
        let config = VolumeConfig {
            name: name.to_owned(),
            uuid: new_uuid(),
            geometry,
            main: self.identity(&main)?,
            main_last_path: main.path.display().to_string(),
            spares: records,
            policy,
            unreadable,
            pending_mode,
            meta_area_sectors: area,
            host: self.host_id.clone(),
            pending_marked: true,
            data_offset: front,
            main_uuid: (!in_place).then(new_uuid),
            evacuation: None,
            cuts: Default::default(),
        };
        let journal = Journal::new(layout, uuid_bytes(&config.uuid));
        let mut vol = Volume {
            config,
            journal,
            main,
            spares,
            pool,
            remaps: RemapTable::default(),
            regions: BTreeMap::new(),
            groups: BTreeMap::new(),
            dev: (0, 0),
            target: None,
            rolling: None,
            rendered: Default::default(),
        };
        // Old metadata on a spare must not outrank ours at assembly: wipe both slots first.
        for s in vol.spares.values() {
            self.k.wipe_metadata(s)?;
        }
        // The header before the metadata: a crash between them leaves a header that names a
        // volume no spare knows (refused at create, nothing assembles), never metadata that
        // points at a main whose data is not where it says.
        if vol.config.has_header() {
            self.write_header(&vol, main_size / SECTOR)?;
        }
        let undo_header = |engine: &Self, vol: &Volume| {
            if vol.config.has_header() {
                let _ = header::erase(&engine.k.io, &vol.main);
            }
        };
        if let Err(e) = self.k.checkpoint(&mut vol) {
            undo_header(self, &vol);
            return Err(e);
        }
        crash_point("create-after-metadata");
        if let Err(e) = self.k.build_devices(&mut vol) {
            self.k.teardown(&vol);
            for s in vol.spares.values() {
                let _ = self.k.wipe_metadata(s);
            }
            undo_header(self, &vol);
            return Err(e);
        }
        let chunk_bytes = vol.geo().chunk * SECTOR;
        for d in vol.members() {
            if let Err(e) = self.k.watch.watch(d, chunk_bytes) {
                tracing::error!(device = %d.path.display(), "cannot watch: {e}");
            }
        }
        tracing::info!(
            volume = name,
            main = %vol.main.path.display(),
            spares = vol.spares.len(),
            regions = vol.regions.len(),
            "created /dev/mapper/{name}"
        );
        let status = views::status_of(&vol);
        self.k.mirror(&vol, Some(&[]));
        self.volumes.insert(name.to_owned(), vol);
        Ok(status)
    }

    pub fn stop(&mut self, name: &str) -> Result<views::Stopped> {
        let vol = self.volume(name)?;
        self.k.dm.remove(name).map_err(|e| {
            EngineError::Refused(format!(
                "cannot remove /dev/mapper/{name} ({e}); is it mounted or open?"
            ))
        })?;
        // Groups before the regions they hold.
        let below = vol.groups.keys().map(|f| group_name(name, *f));
        for dn in below.chain(vol.regions.keys().map(|r| region_name(name, *r))) {
            self.k
                .dm
                .remove(&dn)
                .map_err(|e| failed(format!("removing {dn}"))(e.to_string()))?;
        }
        let vol = self.volumes.remove(name).expect("looked up above");
        let unmirrored = self.mirror_backlog.remove(name).unwrap_or(u64::MAX);
        for d in vol.members() {
            let _ = self.k.watch.unwatch(d);
        }
        for s in vol.spares.values() {
            self.k.watch.mirror_pool(s, None);
        }
        let vdev = kernel_dev(vol.dev.0, vol.dev.1);
        for (chunk, _) in vol.remaps.range(0..unmirrored) {
            self.k.watch.mirror_remap(
                RemapKey {
                    volume_dev: vdev,
                    _pad: 0,
                    chunk,
                },
                None,
            );
        }
        self.stopped.insert(name.to_owned());
        tracing::info!(volume = name, "stopped");
        Ok(views::Stopped {
            stopped: name.to_owned(),
        })
    }
}

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    pub(crate) fn pending_mode(
        &mut self,
        main: &BlockDev,
        unreadable: UnreadablePolicy,
    ) -> Result<PendingMode> {
        let has = match self.error_reads {
            Some(h) => h,
            None => match self
                .dm
                .flakey_error_reads(&format!("{}:{}", main.major, main.minor))
            {
                Ok(h) => {
                    self.error_reads = Some(h);
                    h
                }
                // Not an answer about the kernel: not kept, so the next volume asks again.
                Err(e) => {
                    tracing::warn!(
                        device = %main.path.display(),
                        policy = ?unreadable,
                        "cannot tell whether dm-flakey can fail reads only ({e}): unreadable blocks of this volume follow the --unreadable policy"
                    );
                    return Ok(PendingMode::Policy(unreadable));
                }
            },
        };
        Ok(if has {
            PendingMode::FlakeyErrorReads
        } else {
            tracing::warn!(
                policy = ?unreadable,
                "dm-flakey has no error_reads on this kernel: unreadable blocks follow the --unreadable policy"
            );
            PendingMode::Policy(unreadable)
        })
    }
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if ok {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "invalid volume name `{name}`: use 1-64 letters, digits, '-', '_', '.', '+', not starting with '-' or '.'"
        )))
    }
}

pub(crate) fn new_uuid() -> String {
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        // No urandom (a test sandbox): time and pid are unique enough for a volume UUID.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
