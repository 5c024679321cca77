//! Boot and hotplug: the kernel's block-device uevents (what `mdadm --incremental` is run on).
//! A disk that appears (a slow HBA at boot, USB, iSCSI, a spare plugged in later) may complete
//! a volume that is down for want of it: the agent assembles again. A disk that goes away
//! under a volume is a path fault: alerted, nothing moved.
//!
//! The kernel's own broadcast (netlink group 1) is read, not udev's: remapd starts before
//! udev has settled, and with devtmpfs the device node exists before the event is sent.
use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use kobject_uevent::{ActionType, UEvent};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_KOBJECT_UEVENT};

/// Events within this time of each other are one change: a disk and its partitions appear
/// together, and one scan serves them all.
pub const SETTLE: Duration = Duration::from_millis(300);

/// What a uevent means to the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A block device appeared or changed (new size, new partition table): scan again. Its
    /// number, when the event gives it.
    Appeared(Option<(u32, u32)>),
    /// A block device went away.
    Gone { major: u32, minor: u32 },
}

/// The change a kernel uevent packet announces, if it concerns a block device.
pub fn change_of(packet: &[u8]) -> Option<Change> {
    let ev = UEvent::from_netlink_packet(packet).ok()?;
    if ev.subsystem != "block" {
        return None;
    }
    // remap's own device-mapper devices change at every remap (a resume sends a change).
    if ev
        .env
        .get("DM_UUID")
        .is_some_and(|u| u.starts_with("REMAP-"))
    {
        return None;
    }
    let num = |k: &str| ev.env.get(k).and_then(|v| v.parse::<u32>().ok());
    let dev = num("MAJOR").zip(num("MINOR"));
    match ev.action {
        ActionType::Add | ActionType::Online => Some(Change::Appeared(dev)),
        // A change is news for a device-mapper device getting its table (LVM activating a
        // volume); for a disk it is mostly media polling, which must not scan every disk.
        ActionType::Change if ev.env.contains_key("DM_NAME") => Some(Change::Appeared(dev)),
        ActionType::Remove | ActionType::Offline => Some(Change::Gone {
            major: num("MAJOR")?,
            minor: num("MINOR")?,
        }),
        _ => None,
    }
}

/// One settled batch of changes: what appeared (its number, when known), and what went away.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub appeared: Vec<Option<(u32, u32)>>,
    pub gone: Vec<(u32, u32)>,
}

impl Batch {
    fn add(&mut self, c: Change) {
        match c {
            Change::Appeared(d) => self.appeared.push(d),
            Change::Gone { major, minor } => self.gone.push((major, minor)),
        }
    }
}

/// Opens the kernel's uevent broadcast.
pub fn open() -> std::io::Result<Socket> {
    let mut s = Socket::new(NETLINK_KOBJECT_UEVENT)?;
    s.bind(&SocketAddr::new(0, 1))?;
    Ok(s)
}

/// Reads uevents until `send` fails (the agent stopped), handing over settled batches.
pub fn listen(sock: Socket, send: impl Fn(Batch) -> bool) {
    let (tx, rx) = mpsc::channel::<Change>();
    // The socket read blocks; the settling runs beside it on the channel's timeouts.
    std::thread::Builder::new()
        .name("remap-uevents".into())
        .spawn(move || {
            while let Ok((buf, _)) = sock.recv_from_full() {
                if let Some(c) = change_of(&buf)
                    && tx.send(c).is_err()
                {
                    return;
                }
            }
        })
        .ok();
    loop {
        let Ok(first) = rx.recv() else { return };
        let mut batch = Batch::default();
        batch.add(first);
        let until = Instant::now() + SETTLE;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(c) => batch.add(c),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        if !send(batch) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(lines: &[&str]) -> Vec<u8> {
        lines.join("\0").into_bytes()
    }

    #[test]
    fn block_devices_appearing_and_going_are_told_apart_from_the_rest() {
        let add = packet(&[
            "add@/devices/virtual/block/nullb1",
            "ACTION=add",
            "DEVPATH=/devices/virtual/block/nullb1",
            "SUBSYSTEM=block",
            "MAJOR=252",
            "MINOR=1",
            "DEVNAME=nullb1",
            "DEVTYPE=disk",
            "SEQNUM=2211",
        ]);
        assert_eq!(change_of(&add), Some(Change::Appeared(Some((252, 1)))));
        let remove = packet(&[
            "remove@/devices/virtual/block/nullb0",
            "ACTION=remove",
            "DEVPATH=/devices/virtual/block/nullb0",
            "SUBSYSTEM=block",
            "MAJOR=252",
            "MINOR=0",
            "DEVNAME=nullb0",
            "DEVTYPE=disk",
            "SEQNUM=2212",
        ]);
        assert_eq!(
            change_of(&remove),
            Some(Change::Gone {
                major: 252,
                minor: 0
            })
        );
        let net = packet(&[
            "add@/devices/virtual/net/veth0",
            "ACTION=add",
            "DEVPATH=/devices/virtual/net/veth0",
            "SUBSYSTEM=net",
            "SEQNUM=2213",
        ]);
        assert_eq!(change_of(&net), None);
        let ours = packet(&[
            "change@/devices/virtual/block/dm-3",
            "ACTION=change",
            "DEVPATH=/devices/virtual/block/dm-3",
            "SUBSYSTEM=block",
            "DM_NAME=vol0-remap-r0001",
            "DM_UUID=REMAP-0f3c-r0001",
            "SEQNUM=2214",
        ]);
        assert_eq!(change_of(&ours), None, "a remap's own resume");
        let lv = packet(&[
            "change@/devices/virtual/block/dm-4",
            "ACTION=change",
            "DEVPATH=/devices/virtual/block/dm-4",
            "SUBSYSTEM=block",
            "DM_NAME=vg-data",
            "DM_UUID=LVM-abc",
            "SEQNUM=2215",
        ]);
        assert_eq!(
            change_of(&lv),
            Some(Change::Appeared(None)),
            "an LV activated"
        );
        // udev's re-broadcast (group 2) starts with "libudev": not a kernel packet.
        assert_eq!(change_of(b"libudev\0\xfe\xed\xca\xfe"), None);
    }
}
