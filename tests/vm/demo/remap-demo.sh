#!/bin/sh
# `cargo xtask run`: a protected volume over a disk whose bad sectors grow while a workload
# runs on it. remapd's log (on this console) shows each error caught, located and remapped.
. /vm/lib.sh
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

main=$(nullb create --size 256)
sp1=$(nullb create --size 48)
sp2=$(nullb create --size 48)
say "disks: main $main (256 MiB, failing), spares $sp1 $sp2"

say "remapd (its log follows, interleaved with the demo's steps)"
remapd &
n=0; while [ ! -S /run/remap/remapd.sock ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
[ -S /run/remap/remapd.sock ] || { echo "remapd did not start" >&2; exit 1; }

say "remapctl create demo --main $main --spare $sp1 --spare $sp2 --region-size 32MiB"
remapctl create demo --main "$main" --spare "$sp1" --spare "$sp2" --region-size 32MiB || exit 1
# The volume's data starts after remap's header on the main: sector N of the disk is sector
# N - off of the volume.
off=$(( $(json_num "$(remapctl status demo --json)" data_offset) / 512 ))
mkfs.ext4 -q -F /dev/mapper/demo && mkdir -p /mnt/demo && mount /dev/mapper/demo /mnt/demo
say "blkid: the volume holds ext4; the raw main shows remap's header, never the filesystem"
echo "  /dev/mapper/demo: $(blkid -o value -s TYPE /dev/mapper/demo)"
echo "  $main: $(blkid -p -o value -s TYPE "$main" || echo 'no filesystem (sectors 0..'$((off - 1))': remap header)')"
say "workload: files written to ext4 on /dev/mapper/demo"
i=0
while [ $i -lt 40 ]; do
    dd if=/dev/urandom of=/mnt/demo/f$i bs=1M count=4 status=none
    i=$((i + 1))
done
sync
(cd /mnt/demo && sha256sum f* >/tmp/sums)
umount /mnt/demo

round=1
for bad in "20000-20000 90000-90003" "150000-150000 200007-200007 260000-260001" "300000-300007 400100-400100 480000-480000"; do
    say "round $round: the disk grows bad sectors: $bad (disk sectors; the volume's are $off lower)"
    for b in $bad; do nullb bad add "$main" "$b"; done
    say "round $round: reading the whole volume (errors are caught and remapped as they happen)"
    t0=$(date +%s)
    dd if=/dev/mapper/demo of=/dev/null bs=64K iflag=direct conv=noerror status=none 2>/dev/null
    sleep 1
    say "round $round: the unreadable sectors still fail (never read as other data); their neighbours read"
    for b in $bad; do
        s=$((${b%-*} - off)) e=$((${b#*-} - off))
        if dio-read /dev/mapper/demo "$s" 1 2>/dev/null; then r=READ; else r=fails; fi
        # A good sector of the same 4 KiB chunk: after the bad range, or before it.
        if [ $(((e + 1) / 8)) = $((s / 8)) ]; then nb=$((e + 1)); elif [ $((s % 8)) != 0 ]; then nb=$((s - 1)); else nb=; fi
        if [ -z "$nb" ]; then n="none (the whole chunk is bad)"
        elif dio-read /dev/mapper/demo "$nb" 1 2>/dev/null; then n="$nb reads"; else n="$nb FAILS"; fi
        echo "  sector $s: $r; a good neighbour in its chunk: $n"
    done
    round=$((round + 1))
done

say "the files: checksums after the remaps"
mount /dev/mapper/demo /mnt/demo
changed=$(cd /mnt/demo && sha256sum -c /tmp/sums 2>/dev/null | grep -v ': OK$' | sed 's/:.*//' | sort -u | tr '\n' ' ')
umount /mnt/demo
echo "  files that changed or cannot be read in full: ${changed:-none}"
say "remapctl files demo: what owns each pending block"
remapctl files demo
named=$(remapctl files demo --json | grep -o '"owner":"file","path":"/[^"]*"' | sed 's/.*"path":"\///; s/"$//' | sort -u | tr '\n' ' ')
if [ "$named" = "$changed" ]; then
    echo "  the files remapctl names are exactly the files whose checksums changed: ${named:-none}"
else
    echo "  MISMATCH: remapctl names '${named}', checksums changed for '${changed}'"
fi
say "remapctl status demo"
remapctl status demo
say "remapctl pending demo"
remapctl pending demo
say "dmsetup table demo-remap-r0000 (a region: linear segments, remapped chunks on the spares)"
dmsetup table demo-remap-r0000 | head -12
say "bpftool map dump pinned /sys/fs/bpf/remap/COUNTERS"
bpftool map dump pinned /sys/fs/bpf/remap/COUNTERS | tr -d ' \n' | sed 's/},{/}\n{/g; s/^/  /'
echo
exit 0
