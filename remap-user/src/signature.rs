//! What a device already holds, from its first bytes (pure): the signatures of the filesystems,
//! volume managers and partition tables an operator is likely to have on a disk. `remapctl
//! create` refuses to put remap's header over one of them unless told to keep it in place.

/// Bytes from the start of a device that [`probe`] looks at.
pub const PROBE_BYTES: usize = 68 * 1024;

/// (offset, magic, what it is), checked in order.
const SIGNATURES: &[(usize, &[u8], &str)] = &[
    (
        0,
        b"REMAPMBR",
        "remap's header (the main device of a volume)",
    ),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (0, b"XFSB", "an XFS filesystem"),
    (512, b"LABELONE", "an LVM physical volume"),
    (1080, &[0x53, 0xef], "an ext2/ext3/ext4 filesystem"),
    (
        0,
        &[0xfc, 0x4e, 0x2b, 0xa9],
        "an md RAID member (superblock 1.1)",
    ),
    (
        4096,
        &[0xfc, 0x4e, 0x2b, 0xa9],
        "an md RAID member (superblock 1.2)",
    ),
    (65536 + 64, b"_BHRfS_M", "a btrfs filesystem"),
    (4086, b"SWAPSPACE2", "swap space"),
    (4086, b"SWAP-SPACE", "swap space"),
    (512, b"EFI PART", "a GPT partition table"),
    (510, &[0x55, 0xaa], "a partition table or boot sector"),
];

/// What the device whose first bytes are `start` holds, if it is one of the known kinds.
pub fn probe(start: &[u8]) -> Option<&'static str> {
    SIGNATURES.iter().find_map(|(at, magic, what)| {
        (start.get(*at..at + magic.len()) == Some(*magic)).then_some(*what)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(at: usize, magic: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; PROBE_BYTES];
        b[at..at + magic.len()].copy_from_slice(magic);
        b
    }

    #[test]
    fn known_signatures_are_named() {
        assert_eq!(
            probe(&with(1080, &[0x53, 0xef])),
            Some("an ext2/ext3/ext4 filesystem")
        );
        assert_eq!(
            probe(&with(512, b"LABELONE")),
            Some("an LVM physical volume")
        );
        assert_eq!(probe(&with(65600, b"_BHRfS_M")), Some("a btrfs filesystem"));
        assert_eq!(
            probe(&with(4096, &[0xfc, 0x4e, 0x2b, 0xa9])),
            Some("an md RAID member (superblock 1.2)")
        );
    }

    #[test]
    fn an_empty_or_short_device_holds_nothing_known() {
        assert_eq!(probe(&vec![0u8; PROBE_BYTES]), None);
        assert_eq!(probe(&[0u8; 100]), None);
    }
}
