#!/bin/sh
# ext4 on a protected volume over a scsi_debug disk with MEDIUM errors (-ENODATA).
#
# What "files written before the errors are intact after remap" can mean: scsi_debug's medium
# errors are permanent, like a real unreadable sector, so the data under the bad sectors is gone
# by nature and no remap can bring it back. The claim that can be true and that matters is about
# everything else: the remap moves a whole 32 KiB chunk (8 ext4 blocks) while the filesystem is
# mounted and in use, so it must carry the neighbours of the bad sectors (other files' blocks in
# the same chunk, the readable sectors of the damaged blocks) across intact, and it must never
# let a lost block read back as other data. So the injection is chosen to hurt: three bad
# sectors straddling the boundary of two adjacent ext4 blocks that belong to two DIFFERENT
# files, in a chunk that also holds other blocks. After the remap:
#   - every file not touching a bad sector has its original sha256;
#   - the two damaged files fail reads at the damaged 4 KiB block only (never other data), and
#     every other block of theirs is identical; `remapctl pending` lists exactly the 3 sectors;
#   - `e2fsck -n -f` on the volume is clean (the bad sectors are in file data, not metadata);
#   - 6.12: rewriting the two damaged blocks from the original copies makes both files whole
#     again (pending 0); 6.1 (policy error) refuses such writes, so that case is skipped there.
# The files' blocks are found without debugfs: every 4 KiB block of every file starts with a
# unique tag line, and `strings -t d` on the unmounted volume gives each tag's byte offset.
#vm: cases setup auto-remap others-intact damaged-exact pending-exact fsck-clean rewrite
#vm: needs remapd remapctl
#vm: timeout 300
. /vm/lib.sh

VOL=fs
CHUNK_BLOCKS=8 # 32 KiB chunks of 4 KiB ext4 blocks
main=$(scsi-debug create --size 64) || { fail setup "scsi-debug create"; exit 1; }
# Loaded without a medium-error range, scsi_debug clears the medium-error bit of opts (and
# puts its default range at 4660+10), so a range set later with `scsi-debug bad` never fails;
# and with the bit on, a COUNT of 0 fails every read from START on. So: the bit on, and the
# range parked past the end of the 64 MiB disk until the files are in place.
echo 2 >/sys/bus/pseudo/drivers/scsi_debug/opts && scsi-debug bad 131072 1 || { fail setup "scsi_debug opts"; exit 1; }
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)

remapd >/tmp/remapd.out 2>/tmp/remapd.log &
agent=$!
wait_for /tmp/remapd.log "remapd ready" 90 || { fail setup "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
num() { json_num "$(remapctl status $VOL --json)" "$1"; }

if ! out=$(remapctl create --in-place $VOL --main "$main" --spare "$sp1" --spare "$sp2" --chunk-size 32KiB \
    --region-size 16MiB 2>&1); then
    fail setup "create: $out"
    exit 1
fi
mkfs.ext4 -q -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/$VOL || { fail setup "mkfs"; exit 1; }
mkdir -p /mnt/fs
mount /dev/mapper/$VOL /mnt/fs || { fail setup "mount"; exit 1; }

# mkfile ID NBLOCKS OUT: 4 KiB blocks, each a 64-byte tag line "RMPT f=ID b=N" and random text.
mkfile() {
    b=0
    while [ $b -lt "$2" ]; do
        printf '%-63s\n' "RMPT f=$1 b=$b"
        head -c 3024 /dev/urandom | base64 | tr -d '\n' | head -c 4031
        echo
        b=$((b + 1))
    done >"$3"
}

# Sixteen files of 1 to 40 blocks (237 blocks), written and flushed, then unmounted.
SIZES="3 17 8 25 1 12 40 6 9 30 2 14 21 5 11 33"
mkdir -p /tmp/orig
i=10
for n in $SIZES; do
    mkfile $i "$n" /tmp/orig/f$i
    [ "$(stat -c %s /tmp/orig/f$i)" = $((n * 4096)) ] || { fail setup "f$i has the wrong size"; exit 1; }
    cp /tmp/orig/f$i /mnt/fs/f$i
    i=$((i + 1))
done
FILES=$(cd /tmp/orig && ls)
(cd /tmp/orig && sha256sum $FILES) >/tmp/sums
sync
umount /mnt/fs

# Where each block landed: "fsblock file block", sorted by fsblock.
strings -t d -n 12 /dev/mapper/$VOL | awk '$2 == "RMPT" { sub("f=", "", $3); sub("b=", "", $4); print $1, $3, $4 }' >/tmp/tags
awk '{ print int($1 / 4096), "f" $2, $3 }' /tmp/tags | sort -n >/tmp/map
total=0
for n in $SIZES; do total=$((total + n)); done
misaligned=$(awk '$1 % 4096' /tmp/tags | wc -l)
if [ "$(wc -l </tmp/map)" != $total ] || [ "$(awk '{ print $2, $3 }' /tmp/map | sort -u | wc -l)" != $total ] ||
    [ "$misaligned" != 0 ]; then
    fail setup "found $(wc -l </tmp/map) block tags on the volume ($misaligned misaligned), expected $total, each once"
    exit 1
fi

# Two adjacent ext4 blocks P, P+1 of different files in the same chunk.
pick=$(awk -v cb=$CHUNK_BLOCKS 'NR > 1 && $1 == pb + 1 && $2 != pf && $1 % cb != 0 { print pb, pf, pn, $1, $2, $3; exit }
    { pb = $1; pf = $2; pn = $3 }' /tmp/map)
[ -n "$pick" ] || { fail setup "no two adjacent blocks of different files in one chunk: $(head -40 /tmp/map | tr '\n' ';')"; exit 1; }
set -- $pick
P=$1 F1=$2 B1=$3 F2=$5 B2=$6
START=$(((P + 1) * 8 - 1)) # the last sector of block P and the first two of block P+1
BAD="$START $((START + 1)) $((START + 2))"
CH=$((P / CHUNK_BLOCKS))
neighbours=$(awk -v c=$CH -v cb=$CHUNK_BLOCKS 'int($1 / cb) == c { printf "%s%s:%s@%s", sep, $2, $3, $1; sep = " " }' /tmp/map)
pass setup "$total blocks in $(echo $SIZES | tr " " ",") block files; bad sectors $BAD: end of $F1 block $B1 (fs block $P) and start of $F2 block $B2; chunk $CH holds $neighbours"

# --- the disk decays under the files; they are read again: the damaged ones fail, remap follows
scsi-debug bad $START 3 && dio-read /dev/mapper/$VOL $START 1 2>/dev/null && { fail auto-remap "sector $START still reads"; exit 1; }
mount /dev/mapper/$VOL /mnt/fs || { fail auto-remap "remount"; exit 1; }
failed=""
for f in $FILES; do cat /mnt/fs/$f >/dev/null 2>&1 || failed="$failed $f"; done
n=0
while [ "$(num pending)" != 3 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
remaps=$(num remaps)
chunks=$(remapctl remap list $VOL --json | grep -o '"chunk":[0-9]*' | tr -dc '0-9\n' | paste -sd ' ')
expect_eq auto-remap "files whose first read failed" "$(printf '%s\n' $F1 $F2 | sort | paste -sd ' ')" "$(echo $failed)" &&
    expect_eq auto-remap pending 3 "$(num pending)" &&
    expect_eq auto-remap "chunk $CH remapped" 1 "$(echo " $chunks " | grep -c " $CH ")" &&
    pass auto-remap "remaps $remaps (chunks $chunks); $(grep -c 'chunk remapped' /tmp/remapd.log) logged"
[ "$remaps" = 1 ] || info "more chunks than the damaged one moved: $chunks (the failing requests covered them)"

# --- after the remap, from a cold cache: every other file is intact
echo 3 >/proc/sys/vm/drop_caches
ok=1 nok=0
for f in $FILES; do
    case " $F1 $F2 " in *" $f "*) continue ;; esac
    want=$(grep " $f\$" /tmp/sums | cut -d' ' -f1)
    got=$(sha256sum /mnt/fs/$f 2>/dev/null | cut -d' ' -f1)
    if [ "$want" = "$got" ]; then nok=$((nok + 1)); else fail others-intact "$f: sha256 $got, expected $want"; ok=0; fi
done
[ $ok = 1 ] && pass others-intact "$nok files identical (sha256), including the chunk's neighbours"

# --- the damaged files: exactly the damaged block fails, the rest is identical
damaged_ok() { # damaged_ok FILE BLOCK: prints what is wrong, if anything
    bn=$(($(stat -c %s /tmp/orig/$1) / 4096))
    b=0
    while [ $b -lt $bn ]; do
        if dd if=/mnt/fs/$1 of=/tmp/got bs=4096 skip=$b count=1 iflag=direct status=none 2>/dev/null; then
            [ $b = "$2" ] && echo "$1 block $b (damaged) read"
            dd if=/tmp/orig/$1 of=/tmp/want bs=4096 skip=$b count=1 status=none
            cmp -s /tmp/want /tmp/got || echo "$1 block $b differs"
        else
            [ $b = "$2" ] || echo "$1 block $b fails"
        fi
        b=$((b + 1))
    done
}
w=$(damaged_ok $F1 $B1; damaged_ok $F2 $B2)
for f in $F1 $F2; do
    cat /mnt/fs/$f >/dev/null 2>&1 && w="$w; $f reads whole (buffered)"
done
[ -z "$w" ] && pass damaged-exact "$F1 fails at block $B1 only, $F2 at block $B2 only; their other blocks identical" ||
    fail damaged-exact "$w"

p=$(remapctl pending $VOL --json)
expect_eq pending-exact "pending sectors" "$BAD" "$(echo "$p" | grep -o '"lba":[0-9]*' | tr -dc '0-9\n' | sort -n | paste -sd ' ')" &&
    pass pending-exact "$p"

# --- fsck
umount /mnt/fs
if fsck.ext4 -n -f /dev/mapper/$VOL >/tmp/fsck.out 2>&1; then
    pass fsck-clean "$(tail -1 /tmp/fsck.out)"
else
    fail fsck-clean "exit $?: $(tail -5 /tmp/fsck.out | tr '\n' ' ')"
fi

# --- the owner restores the two damaged blocks from the originals
mode=$(json_str "$(remapctl status $VOL --json)" pending_mode)
if [ "$mode" = error-reads ]; then
    mount /dev/mapper/$VOL /mnt/fs
    dd if=/tmp/orig/$F1 of=/mnt/fs/$F1 bs=4096 skip=$B1 seek=$B1 count=1 conv=notrunc oflag=direct status=none &&
        dd if=/tmp/orig/$F2 of=/mnt/fs/$F2 bs=4096 skip=$B2 seek=$B2 count=1 conv=notrunc oflag=direct status=none
    rc=$?
    n=0
    while [ "$(num pending)" != 0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    umount /mnt/fs
    mount /dev/mapper/$VOL /mnt/fs
    ok=1
    for f in $FILES; do
        want=$(grep " $f\$" /tmp/sums | cut -d' ' -f1)
        [ "$want" = "$(sha256sum /mnt/fs/$f 2>/dev/null | cut -d' ' -f1)" ] || { ok=0; fail rewrite "$f differs or fails after the rewrite"; }
    done
    umount /mnt/fs
    expect_eq rewrite "dd exit" 0 $rc && expect_eq rewrite pending 0 "$(num pending)" && [ $ok = 1 ] &&
        fsck.ext4 -n -f /dev/mapper/$VOL >/dev/null 2>&1 &&
        pass rewrite "all 16 files identical and fsck clean after rewriting the 2 damaged blocks"
else
    skip rewrite "kernel $VM_KERNEL: no dm-flakey error_reads; under policy '$mode' pending blocks refuse writes"
fi

remapctl stop $VOL >/dev/null
kill -TERM $agent
wait $agent
exit 0
