#!/bin/sh
# Boot 2 of 2: the same disk file after the power cut of boot 1.
. /vm/lib.sh

d=$(vmdisk data)
dio-read "$d" 0 8 /tmp/meta.blk
if grep -q "^boot1 $VM_KERNEL" /tmp/meta.blk; then
    pass rebooted-same-disk "boot $VM_BOOT of $VM_BOOTS"
else
    fail rebooted-same-disk "no record of boot 1 in sector 0"
fi
want_flushed=$(sed -n 1p /tmp/meta.blk)
want_unflushed=$(sed -n 2p /tmp/meta.blk)
dio-read "$d" 2048 8 /tmp/flushed
expect_eq flushed-write-survives sha256 "$want_flushed" "$(sha256sum </tmp/flushed | cut -c1-64)" &&
    pass flushed-write-survives
dio-read "$d" 8192 8 /tmp/unflushed
if [ "$(sha256sum </tmp/unflushed | cut -c1-64)" = "$want_unflushed" ]; then
    fail unflushed-write-lost "a write that was never flushed survived: the power cut was not abrupt"
else
    pass unflushed-write-lost
fi
exit 0
