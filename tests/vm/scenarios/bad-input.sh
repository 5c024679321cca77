#!/bin/sh
# Bad input to create / spare / remap / stop / status is refused with a clear message and an
# exact exit code (2 invalid, 3 not found, 4 refused), and changes nothing: the agent's
# `status --json` (all volumes), `dmsetup ls`, every device-mapper table and the metadata areas
# of every device involved are byte-identical before and after each attempt.
#vm: cases missing-device not-block-device spare-is-main spare-twice overlap-loop overlap-volume main-in-use spare-in-use spare-mounted spare-too-small lba-past-end count-zero duplicate-spare-add spare-remove-busy spare-remove-not-spare unknown-volume invalid-name name-exists dm-name-exists still-usable
#vm: needs remapd remapctl
#vm: timeout 300
. /vm/lib.sh

m0=$(nullb create --size 64)
s1=$(nullb create --size 24)
s2=$(nullb create --size 24)
m1=$(nullb create --size 32)
s3=$(nullb create --size 24)
small=$(nullb create --size 8) # exactly the metadata area: no room for one chunk
mnt=$(nullb create --size 16)
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$mnt" && mkdir -p /mnt/spare && mount "$mnt" /mnt/spare || { fail spare-mounted "mount failed"; exit 1; }
echo "not a disk" >/tmp/plain

remapd >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!
wait_for /tmp/remapd.log "remapd ready" 90 || { fail still-usable "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }

# A volume with one extent on its first spare, for the cases that need an existing volume.
if ! out=$(remapctl create --in-place vol0 --main "$m0" --spare "$s1" --spare "$s2" --region-size 16MiB 2>&1) ||
    ! out=$(remapctl remap add vol0 0 2>&1); then
    fail still-usable "setup: $out"
    exit 1
fi
dmsetup create other --table "0 8 error" || { fail dm-name-exists "setup: dmsetup create other"; exit 1; }

# What must not change: the agent's view, device-mapper's, and every device's metadata area
# (the first 8 MiB; the mounted one is read through its page cache).
snapshot() {
    echo "== status"
    remapctl status --json 2>&1
    echo "== ls"
    dmsetup ls | sort
    echo "== tables"
    dmsetup table | sort
    for d in $m0 $s1 $s2 $m1 $s3 $small; do
        echo "== $d $(dd if="$d" bs=1M count=8 iflag=direct status=none | crc32)"
    done
    echo "== $mnt $(dd if="$mnt" bs=1M count=8 status=none | crc32)"
}

# attempt CASE CODE PHRASE ARGS...: remapctl ARGS must exit with CODE, say PHRASE (fixed
# string) and change nothing. Returns non-zero (and reports the failure) otherwise.
attempt() {
    c=$1 want=$2 phrase=$3
    shift 3
    snapshot >/tmp/before
    remapctl "$@" >/tmp/out 2>&1
    rc=$?
    snapshot >/tmp/after
    msg=$(cat /tmp/out)
    if [ "$rc" != "$want" ]; then
        fail "$c" "remapctl $*: exit $rc, expected $want: $msg"
        return 1
    fi
    if ! grep -qF -- "$phrase" /tmp/out; then
        fail "$c" "remapctl $*: message lacks '$phrase': $msg"
        return 1
    fi
    if ! cmp -s /tmp/before /tmp/after; then
        fail "$c" "remapctl $*: state changed: $(diff /tmp/before /tmp/after | grep '^[-+][^-+]' | head -6 | tr '\n' ' ')"
        return 1
    fi
    LAST="exit $rc: $msg"
}

attempt missing-device 2 "/dev/nullb99: No such file or directory" create bx --main /dev/nullb99 --spare "$s3" &&
    attempt missing-device 2 "/dev/nope: No such file or directory" create bx --main "$m1" --spare /dev/nope &&
    attempt missing-device 2 "/dev/nope: No such file or directory" spare add vol0 /dev/nope &&
    pass missing-device "$LAST"

attempt not-block-device 2 "/tmp/plain is not a block device" create bx --main /tmp/plain --spare "$s3" &&
    attempt not-block-device 2 "/dev/null is not a block device" create bx --main "$m1" --spare /dev/null &&
    attempt not-block-device 2 "/tmp/plain is not a block device" spare add vol0 /tmp/plain &&
    pass not-block-device "$LAST"

attempt spare-is-main 2 "spare $m1 is the main device itself" create bx --main "$m1" --spare "$m1" &&
    pass spare-is-main "$LAST"

attempt spare-twice 2 "spare $s3 is given twice" create bx --main "$m1" --spare "$s3" --spare "$s3" &&
    pass spare-twice "$LAST"

# Devices that share sectors with a member, by another path: a loop device over vol0's main, the
# volume vol0 itself. (A device-mapper device over a disk holds it: that is "in use".)
loopdev=/dev/loop7
losetup "$loopdev" "$m0" || { fail overlap-loop "setup: losetup"; }
attempt overlap-loop 4 "overlaps $m0 of volume \`vol0\`" spare add vol0 "$loopdev" &&
    attempt overlap-loop 4 "overlaps $m0 of volume \`vol0\`" create bx --main "$m1" --spare "$loopdev" &&
    pass overlap-loop "$LAST"
losetup -d "$loopdev"
attempt overlap-volume 4 "of volume \`vol0\`" spare add vol0 /dev/mapper/vol0 &&
    attempt overlap-volume 4 "of volume \`vol0\`" create bx --main "$m1" --spare /dev/mapper/vol0 &&
    pass overlap-volume "$LAST"

attempt main-in-use 4 "main device $m0 is already part of volume \`vol0\`" create bx --main "$m0" --spare "$s3" &&
    attempt main-in-use 4 "main device $s1 is already part of volume \`vol0\`" create bx --main "$s1" --spare "$s3" &&
    pass main-in-use "$LAST"

attempt spare-in-use 4 "spare $s1 is already part of volume \`vol0\`" create bx --main "$m1" --spare "$s1" &&
    attempt spare-in-use 4 "spare $m0 is already part of volume \`vol0\`" create bx --main "$m1" --spare "$s3" --spare "$m0" &&
    pass spare-in-use "$LAST"

attempt spare-mounted 4 "is mounted on /mnt/spare" create bx --main "$m1" --spare "$mnt" &&
    attempt spare-mounted 4 "is mounted on /mnt/spare" create bx --main "$mnt" --spare "$s3" &&
    attempt spare-mounted 4 "is mounted on /mnt/spare" spare add vol0 "$mnt" &&
    pass spare-mounted "$LAST"

attempt spare-too-small 2 "no room for one chunk" create bx --main "$m1" --spare "$s3" --spare "$small" &&
    attempt spare-too-small 2 "no room for one chunk" spare add vol0 "$small" &&
    pass spare-too-small "$LAST"

# vol0 is 64 MiB: sectors 0..131071.
attempt lba-past-end 2 "past the end" remap add vol0 131072 &&
    attempt lba-past-end 2 "past the end" remap add vol0 131071 --count 2 &&
    attempt lba-past-end 2 "past the end" remap add vol0 18446744073709551615 &&
    pass lba-past-end "$LAST"

attempt count-zero 2 "--count must be at least 1" remap add vol0 8 --count 0 &&
    pass count-zero "$LAST"

attempt duplicate-spare-add 4 "spare $s1 is already part of volume \`vol0\`" spare add vol0 "$s1" &&
    attempt duplicate-spare-add 4 "spare $s2 is already part of volume \`vol0\`" spare add vol0 "$s2" &&
    pass duplicate-spare-add "$LAST"

attempt spare-remove-busy 4 "$s1 holds 1 remapped chunks" spare remove vol0 "$s1" &&
    pass spare-remove-busy "$LAST"

attempt spare-remove-not-spare 3 "$s3 is not a spare of \`vol0\`" spare remove vol0 "$s3" &&
    attempt spare-remove-not-spare 3 "$m0 is not a spare of \`vol0\`" spare remove vol0 "$m0" &&
    pass spare-remove-not-spare "$LAST"

ok=1
for a in "status nosuch" "stop nosuch" "spare add nosuch $s3" "spare remove nosuch $s1" "spare list nosuch" \
    "remap add nosuch 0" "remap list nosuch" "pending nosuch"; do
    # shellcheck disable=SC2086 # word splitting intended
    attempt unknown-volume 3 "no volume named \`nosuch\`" $a || { ok=0; break; }
done
[ $ok = 1 ] && pass unknown-volume "$LAST"

long=$(printf 'v%.0s' $(seq 65))
attempt invalid-name 2 "invalid volume name \`bad/name\`" create bad/name --main "$m1" --spare "$s3" &&
    attempt invalid-name 2 "invalid volume name \`$long\`" create "$long" --main "$m1" --spare "$s3" &&
    attempt invalid-name 2 "invalid volume name \`.hidden\`" create .hidden --main "$m1" --spare "$s3" &&
    attempt invalid-name 2 "invalid volume name \`\`" create "" --main "$m1" --spare "$s3" &&
    pass invalid-name "$LAST"

attempt name-exists 4 "volume \`vol0\` already exists" create vol0 --main "$m1" --spare "$s3" &&
    pass name-exists "$LAST"

attempt dm-name-exists 4 "a device-mapper device named \`other\` already exists" create other --main "$m1" --spare "$s3" &&
    pass dm-name-exists "$LAST"

# The devices refused above were refused for what they are, not left claimed: the good ones
# make a volume now.
if out=$(remapctl create --in-place bx --main "$m1" --spare "$s3" 2>&1) && [ -b /dev/mapper/bx ]; then
    expect_eq still-usable "volumes" 2 "$(remapctl status --json | grep -o '"uuid"' | wc -l)" &&
        remapctl stop bx >/dev/null && pass still-usable
else
    fail still-usable "create bx: $out"
fi

remapctl stop vol0 >/dev/null
umount /mnt/spare
kill -TERM $agent
wait $agent
exit 0
