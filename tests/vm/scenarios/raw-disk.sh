#!/bin/sh
# The raw main hidden: by default a volume's data sits after remap's header on the main, so
# blkid, udev, LVM or mdadm looking at the raw disk find nothing of the volume (no filesystem
# they could mount behind the remaps' back). Errors the disk reports in its own sectors move
# the volume's chunks at that offset; assembly finds a main with no serial by its header and
# refuses a main carrying another volume's; create never hides a filesystem behind a header
# unless told to keep it in place; a zoned disk is refused; fstrim through a volume reaches its
# disks and clears the pending blocks it discards; on a 512e disk a bad physical sector is
# remapped whole; `remapctl member` tells the udev rule which disks to hide.
#vm: cases header-create raw-main-hidden remap-at-offset assembled-by-header foreign-header-refused filesystem-kept-in-place zoned-refused fstrim-reaches-the-disks physical-sector-whole members-for-udev
#vm: needs remapd remapctl
#vm: timeout 420
. /vm/lib.sh

VOL=vol0
MIB=1048576
main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)

remapd --socket /run/remap/remapd.sock >/tmp/remapd.out 2>/tmp/remapd.log &
wait_for /tmp/remapd.log "remapd ready" 90 || { fail header-create "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
status() { remapctl status "${1:-$VOL}" --json; }

# --- create: the default puts a header on the main, the data 1 MiB in, 1 MiB kept at the end
if out=$(remapctl create "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB 2>&1) &&
    st=$(status); then
    off=$(($(json_num "$st" data_offset) / 512))
    expect_eq header-create raw_main header "$(json_str "$st" raw_main)" &&
        expect_eq header-create "data offset" $MIB "$(json_num "$st" data_offset)" &&
        expect_eq header-create size $((62 * MIB)) "$(json_num "$st" size_bytes)" &&
        pass header-create "$(remapctl status "$VOL" | grep 'raw main')"
else
    fail header-create "$out"
    exit 1
fi

# --- a filesystem on the volume is invisible on the raw main
magic() { dd if="$1" bs=1 skip=1080 count=2 status=none | od -An -tx1 | tr -d ' '; }
if mkfs.ext4 -q -F "/dev/mapper/$VOL"; then
    vol_type=$(blkid -p -o value -s TYPE "/dev/mapper/$VOL")
    raw_type=$(blkid -p -o value -s TYPE "$main")
    raw_rc=$?
    wiped=$(wipefs -n "$main" 2>&1)
    expect_eq raw-main-hidden "blkid of the volume" ext4 "$vol_type" &&
        expect_eq raw-main-hidden "ext4 magic through the volume" 53ef "$(magic "/dev/mapper/$VOL")" &&
        expect_eq raw-main-hidden "bytes 1080-1081 of the raw main" 0000 "$(magic "$main")" &&
        expect_eq raw-main-hidden "blkid -p of the raw main (2: nothing found)" "2 " "$raw_rc $raw_type" &&
        expect_eq raw-main-hidden "wipefs -n of the raw main" "" "$wiped" &&
        pass raw-main-hidden "blkid finds ext4 on the volume, nothing on $main"
else
    fail raw-main-hidden "mkfs.ext4 failed"
fi

# --- bad sectors, in the disk's own numbering, move the volume's chunks at the offset
dd if=/dev/urandom of="/dev/mapper/$VOL" bs=1M count=62 oflag=direct status=none
dd if="/dev/mapper/$VOL" of=/tmp/golden bs=1M iflag=direct status=none
bad="1001 40003 100000 100001"
for s in $bad; do nullb bad add "$main" $((s + off))-$((s + off)); done
chunks="125 5000 12500"
for c in $chunks; do dio-read "/dev/mapper/$VOL" $((c * 8)) 8 2>/dev/null; done
n=0
while [ "$(json_num "$(status)" remaps)" != 3 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
ok=1
for c in $chunks; do
    i=0
    while [ $i -lt 8 ]; do
        s=$((c * 8 + i))
        case " $bad " in
        *" $s "*)
            dio-read "/dev/mapper/$VOL" $s 1 2>/dev/null && { fail remap-at-offset "unreadable sector $s read"; ok=0; } ;;
        *)
            dd if=/tmp/golden of=/tmp/want bs=512 skip=$s count=1 status=none
            if ! dio-read "/dev/mapper/$VOL" $s 1 /tmp/got 2>/dev/null || ! cmp -s /tmp/want /tmp/got; then
                fail remap-at-offset "sector $s (chunk $c) differs or fails"
                ok=0
            fi ;;
        esac
        i=$((i + 1))
    done
done
st=$(status)
[ $ok = 1 ] && expect_eq remap-at-offset remaps 3 "$(json_num "$st" remaps)" &&
    expect_eq remap-at-offset "pending blocks" 4 "$(json_num "$st" pending)" &&
    pass remap-at-offset "chunks $chunks moved for disk sectors $((1001 + off)).. ; neighbours identical"

# --- assembly: a second disk of the main's size, neither with a serial; the header decides
twin=$(nullb create --size 64)
remapctl stop "$VOL" >/dev/null
if out=$(remapctl assemble "$VOL" 2>&1) && st=$(status); then
    dd if=/tmp/golden of=/tmp/want bs=512 skip=999 count=1 status=none
    if dio-read "/dev/mapper/$VOL" 999 1 /tmp/got 2>/dev/null && cmp -s /tmp/want /tmp/got; then
        expect_eq assembled-by-header main "$main" "$(json_str "$st" main)" &&
            expect_eq assembled-by-header remaps 3 "$(json_num "$st" remaps)" &&
            pass assembled-by-header "$main chosen over $twin of the same size"
    else
        fail assembled-by-header "assembled, but sector 999 does not read back: $out"
    fi
else
    fail assembled-by-header "$out"
fi

# --- a main whose header belongs to another volume is refused
m2=$(nullb create --size 64)
s3=$(nullb create --size 24)
remapctl create vol1 --main "$m2" --spare "$s3" --region-size 16MiB >/dev/null 2>&1 || fail foreign-header-refused "create vol1"
remapctl stop vol1 >/dev/null
remapctl stop "$VOL" >/dev/null
last=$((64 * MIB / 4096 - 1))
# The header's two copies (first and last 4 KiB) of a disk, to a file and back.
save_header() { # DEV FILE
    dd if="$1" of="$2.front" bs=4096 count=1 iflag=direct status=none &&
        dd if="$1" of="$2.back" bs=4096 count=1 skip=$last iflag=direct status=none
}
put_header() { # FILE DEV
    dd if="$1.front" of="$2" bs=4096 count=1 oflag=direct conv=notrunc status=none &&
        dd if="$1.back" of="$2" bs=4096 count=1 seek=$last oflag=direct conv=notrunc status=none
}
save_header "$main" /tmp/own
save_header "$m2" /tmp/vol1
put_header /tmp/vol1 "$main"
out=$(remapctl assemble "$VOL" 2>&1)
rc1=$?
out2=$(remapctl assemble "$VOL" --main "$main" 2>&1)
rc2=$?
if [ $rc1 -ne 0 ] && [ $rc2 -ne 0 ] && [ ! -b "/dev/mapper/$VOL" ]; then
    case "$out2" in
    *"another volume (\`vol1\`"*)
        put_header /tmp/own "$main"
        if remapctl assemble "$VOL" >/dev/null 2>&1 && [ -b "/dev/mapper/$VOL" ]; then
            pass foreign-header-refused "refused while it carried vol1's header; assembled once its own was back"
        else
            fail foreign-header-refused "its own header back, assembly still fails"
        fi ;;
    *) fail foreign-header-refused "refused without naming the other volume: $out2" ;;
    esac
else
    fail foreign-header-refused "assembled a main carrying vol1's header ($rc1/$rc2): $out $out2"
fi

# --- a disk that already holds a filesystem: refused unless kept in place, and then its
# files read through the volume
m3=$(nullb create --size 32)
s4=$(nullb create --size 16)
mkfs.ext4 -q -F "$m3" && mkdir -p /mnt/m3 && mount "$m3" /mnt/m3 &&
    dd if=/dev/urandom of=/mnt/m3/file bs=1M count=4 status=none && sync &&
    sum=$(sha256sum </mnt/m3/file) && umount /mnt/m3
before=$(dd if="$m3" bs=1M count=2 iflag=direct status=none | sha256sum)
out=$(remapctl create vol2 --main "$m3" --spare "$s4" --region-size 16MiB 2>&1)
rc=$?
after=$(dd if="$m3" bs=1M count=2 iflag=direct status=none | sha256sum)
if [ $rc -eq 4 ] && [ "$before" = "$after" ] && [ ! -b /dev/mapper/vol2 ]; then
    case "$out" in
    *"ext2/ext3/ext4"*"--in-place"*)
        if remapctl create vol2 --in-place --main "$m3" --spare "$s4" --region-size 16MiB >/dev/null 2>&1 &&
            mount /dev/mapper/vol2 /mnt/m3 && got=$(sha256sum </mnt/m3/file) && umount /mnt/m3; then
            expect_eq filesystem-kept-in-place "file through the volume" "$sum" "$got" &&
                expect_eq filesystem-kept-in-place raw_main in-place "$(json_str "$(status vol2)" raw_main)" &&
                pass filesystem-kept-in-place "refused (disk unchanged), then protected in place with its file"
        else
            fail filesystem-kept-in-place "--in-place create or mount failed"
        fi ;;
    *) fail filesystem-kept-in-place "refusal does not say what it found and what to do: $out" ;;
    esac
else
    fail filesystem-kept-in-place "exit $rc, disk changed: $([ "$before" = "$after" ] && echo no || echo yes): $out"
fi

# --- host-managed zoned disks take sequential writes only: refused
if z=$(nullb create --size 64 --zoned 2>/tmp/zerr) && [ "$(cat /sys/block/${z#/dev/}/queue/zoned)" = host-managed ]; then
    s5=$(nullb create --size 16)
    out=$(remapctl create vz --main "$z" --spare "$s5" 2>&1)
    rc=$?
    if [ $rc -eq 2 ] && [ ! -b /dev/mapper/vz ]; then
        case "$out" in
        *"zoned device (host-managed)"*) pass zoned-refused "$out" ;;
        *) fail zoned-refused "refused for another reason: $out" ;;
        esac
    else
        fail zoned-refused "exit $rc: $out"
    fi
else
    fail zoned-refused "no zoned null_blk on kernel $VM_KERNEL: $(cat /tmp/zerr)"
fi

# --- discards: fstrim on ext4 over a volume with remaps and a pending block in free space
dm=$(nullb create --size 64 --discard)
ds1=$(nullb create --size 24 --discard)
ds2=$(nullb create --size 24 --discard)
if out=$(remapctl create vd --main "$dm" --spare "$ds1" --spare "$ds2" --region-size 16MiB 2>&1) &&
    mkfs.ext4 -q -F /dev/mapper/vd && mkdir -p /mnt/vd && mount /dev/mapper/vd /mnt/vd; then
    doff=$(($(json_num "$(status vd)" data_offset) / 512))
    mode=$(json_str "$(status vd)" pending_mode)
    for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/vd/f$i bs=1M count=1 status=none; done
    sync
    sums=$(cd /mnt/vd && sha256sum f1 f2 f3 f4)
    # Healthy chunks moved by hand (where the files are, and not), and one block gone bad in
    # free space near the end of the filesystem (52 MiB in): it is pending.
    remapctl remap add vd 0 --count 64 >/dev/null && remapctl remap add vd 20000 --count 64 >/dev/null
    nullb bad add "$dm" $((doff + 106497))-$((doff + 106497))
    dio-read /dev/mapper/vd 106496 8 2>/dev/null
    n=0
    while [ "$(json_num "$(status vd)" pending)" != 1 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    remaps=$(json_num "$(status vd)" remaps)
    trimmed=$(fstrim -v /mnt/vd 2>&1)
    rc=$?
    n=0
    while [ "$(json_num "$(status vd)" pending)" != 0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    st=$(status vd)
    now=$(cd /mnt/vd && sha256sum f1 f2 f3 f4)
    umount /mnt/vd
    fsck=$(e2fsck -fn /dev/mapper/vd 2>&1)
    frc=$?
    if [ "$mode" = error-reads ]; then
        expect_eq fstrim-reaches-the-disks "fstrim exit ($trimmed)" 0 $rc &&
            expect_eq fstrim-reaches-the-disks "pending blocks after fstrim" 0 "$(json_num "$st" pending)" &&
            expect_eq fstrim-reaches-the-disks "remaps kept" "$remaps" "$(json_num "$st" remaps)" &&
            expect_eq fstrim-reaches-the-disks "files" "$sums" "$now" &&
            expect_eq fstrim-reaches-the-disks "e2fsck -fn exit ($fsck)" 0 $frc &&
            pass fstrim-reaches-the-disks "$trimmed; the discarded pending block is pending no more, $remaps remaps kept"
    else
        # No error_reads on this kernel: a pending block is an error target, where a discard
        # ends inside device-mapper and never reaches the disk (KERNEL-FACTS.md): fstrim
        # succeeds, the block stays pending and keeps failing reads, nothing is lost.
        expect_eq fstrim-reaches-the-disks "fstrim exit ($trimmed)" 0 $rc &&
            expect_eq fstrim-reaches-the-disks "pending blocks (mode $mode)" 1 "$(json_num "$st" pending)" &&
            expect_eq fstrim-reaches-the-disks "files" "$sums" "$now" &&
            expect_eq fstrim-reaches-the-disks "e2fsck -fn exit ($fsck)" 0 $frc &&
            if dio-read /dev/mapper/vd 106497 1 2>/dev/null; then
                fail fstrim-reaches-the-disks "mode $mode: the pending block read after fstrim"
            else
                pass fstrim-reaches-the-disks "mode $mode: $trimmed; the pending block stays pending and failing, files intact"
            fi
    fi
else
    fail fstrim-reaches-the-disks "setup: $out"
fi

# --- 512e: 4 KiB physical sectors behind 512-byte logical ones; one bad logical sector is a
# bad physical sector, so all eight fail and the whole 4 KiB is pending
e=$(scsi-debug create --size 64 --physblk-exp 3)
# Medium errors on, at a sector past the end (as ext4-scsi does) until one is placed.
echo 2 >/sys/bus/pseudo/drivers/scsi_debug/opts && scsi-debug bad 131072 1
s6=$(nullb create --size 16)
s7=$(nullb create --size 16)
if out=$(remapctl create v512e --main "$e" --spare "$s6" --spare "$s7" --region-size 16MiB 2>&1); then
    st=$(status v512e)
    eoff=$(($(json_num "$st" data_offset) / 512))
    dd if=/dev/urandom of=/dev/mapper/v512e bs=1M count=4 oflag=direct status=none
    dd if=/dev/mapper/v512e of=/tmp/g512 bs=1M count=4 iflag=direct status=none
    # Logical sector 8*300+3 of the volume: physical sector 300 of it.
    scsi-debug bad $((eoff + 2403)) 1
    dio-read /dev/mapper/v512e 2400 8 2>/dev/null
    n=0
    while [ "$(json_num "$(status v512e)" remaps)" != 1 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    st=$(status v512e)
    failing=0
    for i in 0 1 2 3 4 5 6 7; do dio-read /dev/mapper/v512e $((2400 + i)) 1 2>/dev/null || failing=$((failing + 1)); done
    dd if=/tmp/g512 of=/tmp/want bs=512 skip=2408 count=8 status=none
    if dio-read /dev/mapper/v512e 2408 8 /tmp/got && cmp -s /tmp/want /tmp/got; then next=same; else next=differs; fi
    expect_eq physical-sector-whole block_size 4096 "$(json_num "$st" block_size)" &&
        expect_eq physical-sector-whole remaps 1 "$(json_num "$st" remaps)" &&
        expect_eq physical-sector-whole "pending blocks" 1 "$(json_num "$st" pending)" &&
        expect_eq physical-sector-whole "logical sectors of the bad physical one that fail" 8 "$failing" &&
        expect_eq physical-sector-whole "next physical sector" same "$next" &&
        pass physical-sector-whole "one bad logical sector: its 4 KiB physical sector pending as one block"
else
    fail physical-sector-whole "create on the 512e disk: $out"
fi

# --- what the udev rule learns from `remapctl member`: a main by its header, a spare by its
# metadata, an in-place main by the list remapd keeps (by WWN or serial: scsi_debug has one,
# null_blk has neither and cannot be listed), and nothing for other disks
remapctl stop v512e >/dev/null
scsi-debug destroy
sd=$(scsi-debug create --size 32)
s8=$(nullb create --size 16)
list=/etc/remap/in-place-mains
if out=$(remapctl create vip --in-place --main "$sd" --spare "$s8" --region-size 16MiB 2>&1); then
    n=0
    while ! grep -q " vip$" $list 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    m=$(remapctl member "$main" | tr '\n' ' ')
    sp=$(remapctl member "$sp1" | head -1)
    ip=$(remapctl member "$sd" | tr '\n' ' ')
    none=$(remapctl member "$twin")
    expect_eq members-for-udev "header main" "REMAP_MEMBER=main REMAP_VOLUME=vol0 " "$(echo "$m" | cut -d' ' -f1-2) " &&
        expect_eq members-for-udev spare REMAP_MEMBER=spare "$sp" &&
        expect_eq members-for-udev "in-place main" "REMAP_MEMBER=main-in-place REMAP_VOLUME=vip " "$ip" &&
        expect_eq members-for-udev "other disk" "" "$none" &&
        expect_eq members-for-udev "list mode" 600 "$(stat -c %a $list)" &&
        expect_eq members-for-udev "in-place main without serial" "" "$(remapctl member "$m3")" &&
        if grep -q "vol2.*no WWN or serial\|no WWN or serial.*vol2" /tmp/remapd.log; then
            pass members-for-udev "$(grep -v '^#' $list | tr '\n' ';') (vol2's null_blk main is not listable: warned)"
        else
            fail members-for-udev "no warning for vol2's serial-less in-place main"
        fi
else
    fail members-for-udev "create --in-place on scsi_debug: $out"
fi
exit 0
