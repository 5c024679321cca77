#!/bin/sh
# Boot 1 of 2: write a flushed block and an unflushed (page cache only) block, then cut the
# power. Boot 2 checks what survived on the same disk file.
#vm: cases flushed-write-survives unflushed-write-lost rebooted-same-disk
#vm: disk data 16M
#vm: timeout 180
. /vm/lib.sh

d=$(vmdisk data)
head -c 4096 /dev/urandom >/tmp/flushed
head -c 4096 /dev/urandom >/tmp/unflushed
# Flushed: O_DIRECT + fsync. The expected contents ride along on the disk itself (sector 0),
# flushed too, since boot 2 has nothing else from boot 1.
dio-write "$d" 2048 8 /tmp/flushed || fail flushed-write-survives "dio-write failed"
sha256sum </tmp/flushed | cut -c1-64 >/tmp/meta
sha256sum </tmp/unflushed | cut -c1-64 >>/tmp/meta
echo "boot1 $VM_KERNEL" >>/tmp/meta
dd if=/tmp/meta of=/tmp/meta.blk bs=4096 conv=sync status=none
dio-write "$d" 0 8 /tmp/meta.blk || fail flushed-write-survives "dio-write of the metadata failed"
# Unflushed: a buffered write stays in the guest page cache (writeback waits ~30 s). The
# device is held open because the last close of a block device writes its dirty pages back.
exec 3<>"$d"
dd if=/tmp/unflushed of="$d" bs=4096 seek=1024 count=1 conv=notrunc status=none
powercut
