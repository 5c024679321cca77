//! Assembly: finding volumes by their metadata and bringing them up with exactly the table
//! their metadata describes. It never guesses: a missing or ambiguous device, conflicting
//! copies, or an extent claimed twice is refused with what was found and what to do.
mod copies;
mod devices;
mod main_device;
mod restore;
mod scan;

use serde::Serialize;

pub use self::copies::newest_intact_copy;

/// What happened to one volume found on the disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Assembled {
    pub name: String,
    pub uuid: String,
    /// "created", "adopted" (its devices were already up), "already-running" or "refused".
    pub outcome: String,
    pub generation: u64,
    pub remaps: usize,
    /// Why it was refused, or what was repaired on the way (stale copies, reloaded regions).
    pub notes: Vec<String>,
}

#[cfg(test)]
mod tests;
