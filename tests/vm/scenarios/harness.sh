#!/bin/sh
# The laboratory itself: results channel, guest tools, device-mapper, ext4, real O_DIRECT,
# and a deliberately wrong expectation that must be reported as a failure.
#vm: cases channel tools dm-linear ext4-fsck odirect bad-expectation
#vm: expect-fail bad-expectation
#vm: disk scratch 64M
#vm: timeout 240
. /vm/lib.sh

pass channel "kernel $(uname -r)"

missing=""
fio --version >/dev/null 2>&1 || missing="$missing fio"
dmsetup version >/dev/null 2>&1 || missing="$missing dmsetup"
bpftool version >/dev/null 2>&1 || missing="$missing bpftool"
mkfs.ext4 -V >/dev/null 2>&1 || missing="$missing mkfs.ext4"
e2fsck -V >/dev/null 2>&1 || missing="$missing e2fsck"
dd --version 2>/dev/null | grep -q coreutils || missing="$missing GNU-dd"
if [ -z "$missing" ]; then pass tools; else fail tools "not working:$missing"; fi

disk=$(vmdisk scratch)
size=$(blockdev --getsz "$disk")
if dmsetup create lin --table "0 $size linear $disk 0" &&
    head -c 4096 /dev/urandom >/tmp/pat && dio-write /dev/mapper/lin 8 8 /tmp/pat &&
    dio-read "$disk" 8 8 /tmp/back && cmp -s /tmp/pat /tmp/back; then
    pass dm-linear "$(dmsetup table lin)"
else
    fail dm-linear "create/write/read-back through a linear target failed"
fi
dmsetup remove lin 2>/dev/null

if mkfs.ext4 -q -F "$disk" && mkdir -p /mnt/s && mount -t ext4 "$disk" /mnt/s &&
    cp /tmp/pat /mnt/s/f && umount /mnt/s && e2fsck -fn "$disk" >/tmp/fsck 2>&1; then
    pass ext4-fsck
else
    fail ext4-fsck "$(tail -3 /tmp/fsck 2>/dev/null)"
fi

# O_DIRECT really reaches the device: an unaligned direct read must be refused (EINVAL),
# which a dd that silently drops iflag=direct would not do.
if dd if="$disk" of=/dev/null bs=1000 count=1 iflag=direct status=none 2>/dev/null; then
    fail odirect "an unaligned O_DIRECT read succeeded: iflag=direct is ignored"
elif dio-read "$disk" 0 8; then
    pass odirect
else
    fail odirect "an aligned O_DIRECT read failed"
fi

expect_eq bad-expectation "one plus one" 3 $((1 + 1)) && pass bad-expectation
exit 0
