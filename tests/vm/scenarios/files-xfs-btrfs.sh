#!/bin/sh
# Which files lost data on XFS and btrfs directly on a volume. XFS, not mounted: blocks gone
# bad under a file and free space, named by xfs_db; xfs_repair -n finds the metadata sound.
# Mounted: more under another file, a directory and allocation group headers, named by the
# kernel's space map and XFS's block maps; a rewrite of a file's block takes it off the list.
# Not mounted again: xfs_db cannot walk unreadable metadata, so only what the geometry says is
# named, the rest is unknown with the reason; xfs_repair -n reports the failed read. btrfs: a file's block (through the chunk tree and the kernel's
# logical-to-inode lookup), a metadata block and unallocated space; a rewrite (copy on write:
# the file no longer uses the block) takes the file off the list; not mounted, the filesystem
# tree names a file the same way; btrfs check reads the metadata from its other copy.
#vm: cases xfs-named-mounted xfs-rewrite-clears xfs-unmounted-unreadable xfs-named-unmounted xfs-repair btrfs-named btrfs-rewrite-clears btrfs-named-unmounted btrfs-check
#vm: needs remapd remapctl
#vm: timeout 480
. /vm/lib.sh

modprobe xfs && modprobe btrfs || { fail xfs-named-mounted "modprobe xfs btrfs"; exit 1; }
remapd --socket /run/remap/remapd.sock >/tmp/remapd.out 2>/tmp/remapd.log &
wait_for /tmp/remapd.log "remapd ready" 90 || { fail xfs-named-mounted "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
pending() { json_num "$(remapctl status "$1" --json)" pending; }
wait_pending() { # VOL N
    n=0
    while [ "$(pending "$1")" != "$2" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    [ "$(pending "$1")" = "$2" ]
}
# The first sector (512-byte) of a file's or directory's data, from XFS's own map
# (`0: [0..511]: 704..1215`); FIEMAP on btrfs gives the logical address the same way.
first_sector() { xfs_io -r -c "$2" "$1" | awk 'NR == 2 { sub(/\.\..*/, "", $3); print $3; exit }'; }
# bad VOL_MAIN OFF SECTOR...: each sector (of the volume) fails on the disk below.
bad() {
    m=$1 o=$2
    shift 2
    for s in "$@"; do nullb bad add "$m" "$((o + s + 1))-$((o + s + 1))"; done
}
read_all() { /usr/bin/dd if="$1" of=/dev/null bs=4096 iflag=direct conv=noerror status=none 2>/dev/null; }
has() { # CASE TEXT NEEDLE...
    c=$1 t=$2
    shift 2
    for n in "$@"; do
        case "$t" in *"$n"*) ;; *) fail "$c" "missing $n in $t"; return 1 ;; esac
    done
}
owners() { printf '%s' "$1" | grep -o '"owner":"[a-z-]*"' | sort | tr '\n' ' '; }

# ---------------------------------------------------------------- XFS (its minimum is 300 MiB)
main=$(nullb create --size 352)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)
remapctl create vx --main "$main" --spare "$sp1" --spare "$sp2" --region-size 64MiB >/dev/null ||
    { fail xfs-named-mounted "create vx"; exit 1; }
off=$(($(json_num "$(remapctl status vx --json)" data_offset) / 512))
dev=/dev/mapper/vx
mkdir -p /mnt/x /mnt/b
mkfs.xfs -q -f "$dev" && mount -t xfs "$dev" /mnt/x || { fail xfs-named-mounted "mkfs.xfs/mount"; exit 1; }
mkdir /mnt/x/dir
i=0
while [ $i -lt 100 ]; do : >"/mnt/x/dir/an-entry-with-a-rather-long-name-$i"; i=$((i + 1)); done
for f in f1 f2 f3; do dd if=/dev/urandom of=/mnt/x/$f bs=64K count=4 status=none; done
sync
s_f2=$(($(first_sector /mnt/x/f2 bmap) + 24))
s_f3=$(($(first_sector /mnt/x/f3 bmap) + 8))
s_dir=$(first_sector /mnt/x/dir bmap)
agblocks=$(xfs_db -r -c "sb 0" -c "p agblocks" "$dev" | sed -n 's/^agblocks = //p')
# The last allocation group's headers (secondary superblock, AGF, AGI): nothing here writes them.
s_ag=$((3 * agblocks * 8))
# Free: well inside the last group, past its headers and btree roots.
s_free=$((s_ag + 8 * 1000))
info xfs-named-mounted "sectors: /f2 block 3 $s_f2, /f3 block 1 $s_f3, /dir $s_dir, AG 3 headers $s_ag, free $s_free"
# Unmounted before any block goes bad: the metadata is on the disk, not only in the log (XFS
# writes it back in place later, and that write would rewrite the bad blocks under the test).
umount /mnt/x

# Not mounted, every piece of metadata readable: xfs_db's own block usage names the owners.
bad "$main" "$off" "$s_f3" "$s_free"
read_all "$dev"
wait_pending vx 2 || fail xfs-named-unmounted "pending $(pending vx), not 2: $(remapctl pending vx)"
j=$(remapctl files vx --json)
has xfs-named-unmounted "$j" '"owner":"file","path":"/f3","inode":' '"offset":4096,"length":4096' '"owner":"free"' &&
    expect_eq xfs-named-unmounted owners '"owner":"file" "owner":"free" ' "$(owners "$j")" &&
    pass xfs-named-unmounted "$j"
# Lost file data is not the checker's business: with the metadata readable, it is clean.
out=$(xfs_repair -n "$dev" 2>&1)
rc=$?
info xfs-repair "xfs_repair -n, metadata readable: exit $rc: $(printf '%s' "$out" | tail -3 | tr '\n' ';')"
expect_eq xfs-repair "xfs_repair -n exit with the metadata readable" 0 "$rc"

# Mounted: the kernel's space map, XFS's block maps.
mount -t xfs "$dev" /mnt/x || { fail xfs-named-mounted "mount again"; exit 1; }
bad "$main" "$off" "$s_f2" "$s_dir" "$s_ag"
read_all "$dev"
wait_pending vx 5 || { fail xfs-named-mounted "pending: $(pending vx), not 5"; exit 1; }
j=$(remapctl files vx --json)
has xfs-named-mounted "$j" '"owner":"file","path":"/f2","inode":' '"offset":12288,"length":4096' \
    '"owner":"file","path":"/f3","inode":' '"owner":"directory","path":"/dir"' \
    '"owner":"metadata","kind":"superblock and allocation group headers"' '"owner":"free"' &&
    expect_eq xfs-named-mounted owners '"owner":"directory" "owner":"file" "owner":"file" "owner":"free" "owner":"metadata" ' "$(owners "$j")" &&
    pass xfs-named-mounted "$j"

# The file restored through the filesystem: its block rewritten, it leaves the list.
mode=$(json_str "$(remapctl status vx --json)" pending_mode)
if [ "$mode" = error-reads ]; then
    /usr/bin/dd if=/dev/urandom of=/mnt/x/f2 bs=4096 seek=3 count=1 conv=notrunc oflag=direct status=none
    if wait_pending vx 4; then
        j=$(remapctl files vx --json)
        case "$j" in
        *'"path":"/f2"'*) fail xfs-rewrite-clears "/f2 still listed after its block was rewritten: $j" ;;
        *'"path":"/dir"'*) pass xfs-rewrite-clears ;;
        *) fail xfs-rewrite-clears "the others are gone too: $j" ;;
        esac
    else
        fail xfs-rewrite-clears "pending $(pending vx) after the rewrite, not 4: $(remapctl pending vx)"
    fi
else
    skip xfs-rewrite-clears "kernel $VM_KERNEL has no dm-flakey error_reads: a pending block fails writes too (policy $mode)"
fi
umount /mnt/x

# Not mounted, with metadata it cannot read: xfs_db's walk stops there. What the geometry
# says (an allocation group's headers) is still named; the rest is unknown, with the reason.
j=$(remapctl files vx --json)
u=$(printf '%s' "$j" | grep -o 'xfs_db cannot walk this XFS while it is not mounted' | wc -l)
npend=$(json_num "$(remapctl status vx --json)" pending)
has xfs-unmounted-unreadable "$j" '"owner":"metadata","kind":"superblock and allocation group headers"' &&
    expect_eq xfs-unmounted-unreadable "blocks left unknown, with the reason" $((npend - 1)) "$u" &&
    pass xfs-unmounted-unreadable "$j"
out=$(xfs_repair -n "$dev" 2>&1)
rc=$?
info xfs-repair "xfs_repair -n, metadata unreadable: exit $rc: $(printf '%s' "$out" | tail -6 | tr '\n' ';')"
case "$rc:$out" in
0:*) fail xfs-repair "the unreadable metadata went unreported (exit 0)" ;;
*"read failed"*) pass xfs-repair "exit $rc" ;;
*) fail xfs-repair "exit $rc without naming the failed read" ;;
esac

# ---------------------------------------------------------------- btrfs
main2=$(nullb create --size 256)
sp3=$(nullb create --size 24)
sp4=$(nullb create --size 24)
remapctl create vb --main "$main2" --spare "$sp3" --spare "$sp4" --region-size 64MiB >/dev/null ||
    { fail btrfs-named "create vb"; exit 1; }
off2=$(($(json_num "$(remapctl status vb --json)" data_offset) / 512))
bdev=/dev/mapper/vb
mkfs.btrfs -q -f "$bdev" >/dev/null && mount -t btrfs "$bdev" /mnt/b || { fail btrfs-named "mkfs.btrfs/mount"; exit 1; }
for f in g1 g2 g3; do dd if=/dev/urandom of=/mnt/b/$f bs=64K count=4 status=none; done
sync
fm=$(first_sector /mnt/b/g2 fiemap)
[ -n "$fm" ] || { fail btrfs-named "no extent for /mnt/b/g2: $(xfs_io -r -c fiemap /mnt/b/g2 2>&1 | tr '\n' ';')"; exit 1; }
lg=$((fm * 512 + 12288))
# `mirror 1 logical L physical P device D`
p_g2=$(btrfs-map-logical -l "$lg" "$bdev" 2>/dev/null | awk '$1 == "mirror" && $2 == 1 { print $6; exit }')
# A block of a metadata chunk (its first copy), and space no chunk uses (near the end).
p_meta=$(btrfs inspect-internal dump-tree -t chunk "$bdev" |
    awk '/type METADATA/ { m = 1 } m && $1 == "stripe" { print $6; exit }')
size=$(blockdev --getsz "$bdev")
s_free=$((size - 2048))
info btrfs-named "g2 logical $lg physical $p_g2, metadata $p_meta, free sector $s_free"
[ -n "$p_g2" ] && [ -n "$p_meta" ] || { fail btrfs-named "no physical address"; exit 1; }
bad "$main2" "$off2" $((p_g2 / 512)) $((p_meta / 512 + 128)) "$s_free"
read_all "$bdev"
wait_pending vb 3 || { fail btrfs-named "pending: $(pending vb), not 3"; exit 1; }
j=$(remapctl files vb --json)
has btrfs-named "$j" '"owner":"file","path":"/g2","inode":' '"offset":12288,"length":4096' \
    '"owner":"metadata","kind":"metadata trees' '"owner":"free"' &&
    expect_eq btrfs-named owners '"owner":"file" "owner":"free" "owner":"metadata" ' "$(owners "$j")" &&
    pass btrfs-named "$j"

# A rewrite of the file's block goes elsewhere (copy on write): the file no longer uses the
# bad block, so it leaves the list (the block itself stays pending until written).
/usr/bin/dd if=/dev/urandom of=/mnt/b/g2 bs=4096 seek=3 count=1 conv=notrunc oflag=direct status=none
sync
j=$(remapctl files vb --json)
case "$j" in
*'"path":"/g2"'*) fail btrfs-rewrite-clears "/g2 still listed after its block was rewritten: $j" ;;
*'"kind":"metadata trees'*) pass btrfs-rewrite-clears "$j" ;;
*) fail btrfs-rewrite-clears "the others are gone too: $j" ;;
esac
# Not mounted: the filesystem tree names the files (a block of /g3 goes bad first).
fm3=$(first_sector /mnt/b/g3 fiemap)
p_g3=$(btrfs-map-logical -l $((fm3 * 512 + 4096)) "$bdev" 2>/dev/null | awk '$1 == "mirror" && $2 == 1 { print $6; exit }')
umount /mnt/b
[ -n "$p_g3" ] || { fail btrfs-named-unmounted "no physical address for /g3"; exit 1; }
bad "$main2" "$off2" $((p_g3 / 512))
read_all "$bdev"
wait_pending vb 4 || fail btrfs-named-unmounted "pending $(pending vb), not 4"
j=$(remapctl files vb --json)
has btrfs-named-unmounted "$j" '"owner":"file","path":"/g3","inode":' '"offset":4096,"length":4096' \
    '"owner":"metadata","kind":"metadata trees' '"owner":"free"' &&
    expect_eq btrfs-named-unmounted owners '"owner":"file" "owner":"free" "owner":"free" "owner":"metadata" ' "$(owners "$j")" &&
    pass btrfs-named-unmounted "$j"

# btrfs check reads the metadata; the bad copy is covered by the other (DUP).
out=$(btrfs check --readonly "$bdev" 2>&1)
rc=$?
info btrfs-check "btrfs check exit $rc: $(printf '%s' "$out" | tail -12 | tr '\n' ';')"
if [ $rc = 0 ]; then pass btrfs-check; else fail btrfs-check "exit $rc"; fi
exit 0
