#!/bin/sh
# Which files lost data: ext4 on a volume, blocks gone bad under a known file, a directory,
# the inode table and free space; `remapctl files` names exactly those (the file with the
# bytes lost), nothing else; the pending alert names them to the notify hook; a rewrite of the
# file's block takes it off the list. Then the same through what people stack on a volume:
# ext4 on a linear device (as an LVM volume) on dm-crypt (as LUKS) on a second volume, made
# with dmsetup; and made with cryptsetup and lvm on a third.
#vm: cases named-exactly human-readable fsck-reports status-counts-files hook-names-files rewrite-clears through-the-stack lvm-on-luks
#vm: needs remapd remapctl
#vm: timeout 420
. /vm/lib.sh

VOL=vf
main=$(nullb create --size 64)
sp1=$(nullb create --size 24)
sp2=$(nullb create --size 24)
cat >/tmp/hook.sh <<'HOOK'
#!/bin/sh
{ echo "== $REMAP_ALERT_KIND: $REMAP_ALERT"; printf '%s\n' "$REMAP_FILES"; } >>/tmp/hook.log
HOOK
chmod 755 /tmp/hook.sh
remapd --socket /run/remap/remapd.sock --notify-exec /tmp/hook.sh --notify-interval 1 \
    >/tmp/remapd.out 2>/tmp/remapd.log &
wait_for /tmp/remapd.log "remapd ready" 90 || { fail named-exactly "remapd not ready: $(tail -5 /tmp/remapd.log)"; exit 1; }
status() { remapctl status "$VOL" --json; }

remapctl create "$VOL" --main "$main" --spare "$sp1" --spare "$sp2" --region-size 16MiB >/dev/null ||
    { fail named-exactly "create"; exit 1; }
off=$(($(json_num "$(status)" data_offset) / 512))
dev=/dev/mapper/$VOL
mkfs.ext4 -q -F -b 4096 "$dev" && mkdir -p /mnt/vf && mount "$dev" /mnt/vf || { fail named-exactly "mkfs/mount"; exit 1; }
mkdir /mnt/vf/dir
i=0
while [ $i -lt 100 ]; do : >"/mnt/vf/dir/an-entry-with-a-rather-long-name-$i"; i=$((i + 1)); done
for f in f1 f2 f3; do dd if=/dev/urandom of=/mnt/vf/$f bs=64K count=4 status=none; done
sync
umount /mnt/vf

# Filesystem blocks (4 KiB: one chunk each) under: the 4th block of /f2 (bytes 12288-16383),
# the first block of /dir, a block of the inode table, a free block.
b_f2=$(debugfs -R "bmap /f2 3" "$dev" 2>/dev/null)
b_dir=$(debugfs -R "bmap /dir 0" "$dev" 2>/dev/null)
it=$(dumpe2fs "$dev" 2>/dev/null | sed -n 's/^ *Inode table at \([0-9]*\)-.*/\1/p' | head -1)
b_it=$((it + 10))
last_free=$(dumpe2fs "$dev" 2>/dev/null | sed -n 's/^ *Free blocks: //p' | head -1 | tr ',' '\n' | tail -1)
b_free=$((${last_free#*-} - 10))
info named-exactly "blocks: /f2 $b_f2, /dir $b_dir, inode table $b_it, free $b_free"
for b in $b_f2 $b_dir $b_it $b_free; do
    s=$((off + b * 8 + 1))
    nullb bad add "$main" "$s-$s"
done
/usr/bin/dd if="$dev" of=/dev/null bs=4096 iflag=direct conv=noerror status=none 2>/dev/null
n=0
while [ "$(json_num "$(status)" pending)" != 4 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
expect_eq named-exactly "pending blocks" 4 "$(json_num "$(status)" pending)" || exit 1

# --- exactly these owners, and nothing else
j=$(remapctl files "$VOL" --json)
has() { case "$j" in *"$1"*) return 0 ;; esac; fail named-exactly "missing $1 in $j"; return 1; }
owners=$(printf '%s' "$j" | grep -o '"owner":"[a-z-]*"' | sort | tr '\n' ' ')
has '"owner":"file","path":"/f2","inode":' && has '"offset":12288,"length":4096' &&
    has '"owner":"directory","path":"/dir"' &&
    has '"owner":"metadata","kind":"inode table"' &&
    has '"owner":"free"' &&
    expect_eq named-exactly owners '"owner":"directory" "owner":"file" "owner":"free" "owner":"metadata" ' "$owners" &&
    pass named-exactly "$j"

# --- the same for people
out=$(remapctl pending "$VOL" --files)
case "$out" in
*"file /f2 (bytes 12288-16383)"*"2 files or directories lost data"*) pass human-readable "$(echo "$out" | tr '\n' ';')" ;;
*) fail human-readable "$out" ;;
esac

# --- the filesystem's own check sees what was lost: the inode table and directory blocks
# cannot be read (e2fsck -n changes nothing)
out=$(e2fsck -fn "$dev" 2>&1)
rc=$?
info fsck-reports "e2fsck -fn exit $rc: $(printf '%s' "$out" | head -8 | tr '\n' ';')"
case "$rc:$out" in
0:*) fail fsck-reports "e2fsck found nothing wrong" ;;
*"rror reading block"*) pass fsck-reports "exit $rc" ;;
*) fail fsck-reports "exit $rc without a read error" ;;
esac

# --- the status map counts them (named when the pending alert went out, or on this look)
n=0
until remapctl status "$VOL" | grep -q "lost data: 2 files or directories" || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
out=$(remapctl status "$VOL")
case "$out" in
*"lost data: 2 files or directories"*) pass status-counts-files ;;
*) fail status-counts-files "$out" ;;
esac

# --- the hook heard it: the pending alert carries what lost data
n=0
until grep -q "^file /f2 (bytes 12288-16383)$" /tmp/hook.log 2>/dev/null &&
    grep -q "^directory /dir$" /tmp/hook.log && grep -q "^filesystem metadata: inode table$" /tmp/hook.log ||
    [ $n -ge 300 ]; do sleep 0.1; n=$((n + 1)); done
if grep -q "^file /f2 (bytes 12288-16383)$" /tmp/hook.log 2>/dev/null &&
    grep -q "^directory /dir$" /tmp/hook.log && grep -q "^filesystem metadata: inode table$" /tmp/hook.log; then
    if grep -q "free space\|^file /f[13]" /tmp/hook.log; then
        fail hook-names-files "more than what lost data: $(tr '\n' ';' </tmp/hook.log)"
    else
        pass hook-names-files "$(tr '\n' ';' </tmp/hook.log)"
    fi
else
    fail hook-names-files "REMAP_FILES: $(tr '\n' ';' </tmp/hook.log 2>/dev/null); log: $(grep -i "hook\|lost data" /tmp/remapd.log | tail -3)"
fi

# --- the file restored: its block rewritten through the filesystem, it leaves the list
mode=$(json_str "$(status)" pending_mode)
if [ "$mode" = error-reads ]; then
    mount "$dev" /mnt/vf &&
        /usr/bin/dd if=/dev/urandom of=/mnt/vf/f2 bs=4096 seek=3 count=1 conv=notrunc oflag=direct status=none
    n=0
    while [ "$(json_num "$(status)" pending)" != 3 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    j=$(remapctl files "$VOL" --json)
    pend=$(json_num "$(status)" pending)
    umount /mnt/vf
    # /f2's block is data again; /dir's and the free one stay pending (nothing writes them).
    # The inode table block may go too: ext4 writes /f2's inode (its mtime) back in place when
    # it checkpoints its journal, which can come before these reads.
    case "$j" in
    *'"path":"/f2"'*) fail rewrite-clears "/f2 still listed after its block was rewritten: $j" ;;
    *'"path":"/dir"'*'"owner":"free"'* | *'"owner":"free"'*'"path":"/dir"'*)
        case "$pend" in
        3 | 2) pass rewrite-clears "$pend pending blocks left: $j" ;;
        *) fail rewrite-clears "pending blocks: expected 3 (2 once ext4 rewrote the inode table block), got '$pend': $j" ;;
        esac
        ;;
    *) fail rewrite-clears "the others are gone too: $j" ;;
    esac
    # The status map's count follows (named again for the blocks pending now; ext4 may have
    # rewritten the inode table block meanwhile, writing back /f2's inode).
    want=$(remapctl files "$VOL" --json | grep -o '"path":"[^"]*"' | sort -u | wc -l)
    n=0
    until remapctl status "$VOL" | grep -q "lost data: $want files or directories" || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
    expect_eq rewrite-clears "status map's count after the rewrite" "$want" \
        "$(remapctl status "$VOL" | sed -n 's/.*lost data: \([0-9]*\) files.*/\1/p')"
else
    skip rewrite-clears "kernel $VM_KERNEL has no dm-flakey error_reads: a pending block fails writes too (policy $mode)"
fi

# --- through the stack: ext4 on a linear device 2048 sectors into a crypt device whose data
# starts 4096 sectors into the volume (the layouts of LVM and LUKS, made here with dmsetup)
modprobe dm-crypt 2>/dev/null
main2=$(nullb create --size 64)
sp3=$(nullb create --size 24)
sp4=$(nullb create --size 24)
remapctl create vs --main "$main2" --spare "$sp3" --spare "$sp4" --region-size 16MiB >/dev/null ||
    { fail through-the-stack "create vs"; exit 1; }
off2=$(($(json_num "$(remapctl status vs --json)" data_offset) / 512))
size=$(blockdev --getsz /dev/mapper/vs)
dmsetup create vscrypt --table "0 $((size - 4096)) crypt aes-cbc-plain 00112233445566778899aabbccddeeff 0 /dev/mapper/vs 4096" &&
    dmsetup create vslv --table "0 $((size - 4096 - 2048)) linear /dev/mapper/vscrypt 2048" ||
    { fail through-the-stack "dmsetup: $(dmsetup ls | tr '\n' ' ')"; exit 1; }
lv=/dev/mapper/vslv
mkfs.ext4 -q -F -b 4096 "$lv" && mount "$lv" /mnt/vf &&
    dd if=/dev/urandom of=/mnt/vf/g bs=64K count=4 status=none && sync && umount /mnt/vf ||
    { fail through-the-stack "mkfs/mount on $lv"; exit 1; }
b_g=$(debugfs -R "bmap /g 1" "$lv" 2>/dev/null)
# A sector in the second block of /g, and one in the crypt header (volume sector 81).
vlba=$((b_g * 8 + 2048 + 4096))
nullb bad add "$main2" "$((off2 + vlba + 1))-$((off2 + vlba + 1))"
nullb bad add "$main2" "$((off2 + 81))-$((off2 + 81))"
/usr/bin/dd if="$lv" of=/dev/null bs=4096 iflag=direct conv=noerror status=none 2>/dev/null
/usr/bin/dd if=/dev/mapper/vs of=/dev/null bs=4096 skip=10 count=1 iflag=direct status=none 2>/dev/null
n=0
while [ "$(json_num "$(remapctl status vs --json)" pending)" != 2 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
j=$(remapctl files vs --json)
case "$j" in
*'"owner":"file","path":"/g","inode":'*'"offset":4096,"length":4096'*'"on":"/dev/mapper/vslv (sector '"$((b_g * 8 + 1))"', through crypt vscrypt, linear vslv)"'*)
    case "$j" in
    *'"lba":81,'*'no device stacked on it maps this block'*) pass through-the-stack "$j" ;;
    *) fail through-the-stack "the block in the crypt header is not named as outside the stack: $j" ;;
    esac ;;
*) fail through-the-stack "/g (fs block $b_g, volume LBA $vlba) not named through the stack: $j" ;;
esac
dmsetup remove vslv
dmsetup remove vscrypt

# --- the same with the real tools: LUKS2 (cryptsetup) on a volume, an LVM volume group on it,
# ext4 on a logical volume. No udev in the guest: libdevmapper is told not to wait for it.
export DM_DISABLE_UDEV=1
modprobe xts 2>/dev/null
modprobe ecb 2>/dev/null
mkdir -p /run/cryptsetup /run/lock/lvm /run/lvm
main3=$(nullb create --size 96)
sp5=$(nullb create --size 24)
sp6=$(nullb create --size 24)
remapctl create vl --main "$main3" --spare "$sp5" --spare "$sp6" --region-size 16MiB >/dev/null ||
    { fail lvm-on-luks "create vl"; exit 1; }
off3=$(($(json_num "$(remapctl status vl --json)" data_offset) / 512))
head -c 32 /dev/urandom >/tmp/luks.key
LVMC='activation { udev_sync = 0 udev_rules = 0 } devices { obtain_device_list_from_udev = 0 }'
{ cryptsetup luksFormat -q --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file /tmp/luks.key /dev/mapper/vl &&
    cryptsetup open --key-file /tmp/luks.key /dev/mapper/vl vlcrypt &&
    command lvm pvcreate --config "$LVMC" --devices /dev/mapper/vlcrypt /dev/mapper/vlcrypt >/dev/null &&
    command lvm vgcreate --config "$LVMC" --devices /dev/mapper/vlcrypt vgr /dev/mapper/vlcrypt >/dev/null &&
    command lvm lvcreate --config "$LVMC" --devices /dev/mapper/vlcrypt -y -L 40M -n home vgr >/dev/null; } ||
    { fail lvm-on-luks "cryptsetup/lvm: $(dmsetup ls | tr '\n' ' ')"; exit 1; }
home=/dev/mapper/vgr-home
mkfs.ext4 -q -F -b 4096 "$home" && mount "$home" /mnt/vf &&
    dd if=/dev/urandom of=/mnt/vf/h bs=64K count=4 status=none && sync && umount /mnt/vf ||
    { fail lvm-on-luks "mkfs/mount on $home"; exit 1; }
b_h=$(debugfs -R "bmap /h 2" "$home" 2>/dev/null)
# Where the tools put things: the LUKS data offset and the LV's start, from their tables.
crypt_off=$(dmsetup table vlcrypt | awk '{ print $8 }')
lv_off=$(dmsetup table vgr-home | awk '{ print $5 }')
vlba=$((crypt_off + lv_off + b_h * 8))
info lvm-on-luks "LUKS data at $crypt_off, LV at $lv_off, /h block 2 = fs block $b_h, volume LBA $vlba"
nullb bad add "$main3" "$((off3 + vlba + 1))-$((off3 + vlba + 1))"
/usr/bin/dd if="$home" of=/dev/null bs=4096 iflag=direct conv=noerror status=none 2>/dev/null
n=0
while [ "$(json_num "$(remapctl status vl --json)" pending)" != 1 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
j=$(remapctl files vl --json)
case "$j" in
*'"owner":"file","path":"/h","inode":'*'"offset":8192,"length":4096'*'"on":"/dev/mapper/vgr-home (sector '"$((b_h * 8 + 1))"', through crypt vlcrypt, linear vgr-home)"'*)
    pass lvm-on-luks "$j" ;;
*) fail lvm-on-luks "/h (fs block $b_h, volume LBA $vlba) not named through LVM on LUKS: $j" ;;
esac
command lvm vgchange --config "$LVMC" --devices /dev/mapper/vlcrypt -an vgr >/dev/null
cryptsetup close vlcrypt
exit 0
