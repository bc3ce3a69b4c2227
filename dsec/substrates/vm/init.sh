#!/bin/busybox sh
# dsec guest init (PID 1 of the initramfs). The Debian cloud kernel has virtio as modules, so load them,
# mount the sandbox's root disk, and hand PID 1 to dsec-agent serving the virtio-serial port "dsec.agent".
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "dsec-init: $*" > /dev/console
    poweroff -f
}

while read -r module; do
    insmod "/modules/$module.ko" 2>/dev/null
done < /modules.order

case " $(cat /proc/cmdline) " in
*" dsec.probe "*)
    # Accelerator probe: reaching userspace is the proof; powering off ends QEMU (reboot does not, reliably).
    echo DSEC-PROBE-OK > /dev/console
    poweroff -f
    ;;
esac

# Named volumes (dsec/substrates/vm/volumes.py): dsec.vol=<i>,<ro|rw>,<mount path as hex> each, on a disk whose
# serial is dsec-vol<i>. Device names follow probe order, so with volumes the root disk is the one without such
# a serial, found once every disk is there.
vols=""
for word in $(cat /proc/cmdline); do
    case "$word" in
    dsec.vol=*) vols="$vols ${word#dsec.vol=}" ;;
    esac
done
disk_with_serial() {
    for b in /sys/block/vd*; do
        serial="$(cat "$b/serial" 2>/dev/null)"
        case "$serial" in
        dsec-vol*) [ "$serial" = "$1" ] && echo "/dev/${b##*/}" ;;
        *) [ -z "$1" ] && echo "/dev/${b##*/}" ;;
        esac
    done
}
disks=1
for vol in $vols; do
    disks=$((disks + 1))
done

tries=0
while [ ! -b /dev/vda ] || [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -lt $disks ]; do
    tries=$((tries + 1))
    [ $tries -gt 500 ] && fail "no root disk /dev/vda, or fewer than $disks disks"
    usleep 10000
done
root=/dev/vda
[ -n "$vols" ] && root="$(disk_with_serial "")"
mount -t ext4 -o noatime "$root" /newroot || fail "cannot mount $root"

for vol in $vols; do
    index="${vol%%,*}"
    rest="${vol#*,}"
    mode="${rest%%,*}"
    target="/newroot$(printf "$(echo "${rest#*,}" | sed 's/../\\x&/g')")"
    dev="$(disk_with_serial "dsec-vol$index")"
    options="$mode,noatime"
    [ "$mode" = rw ] && options="$options,sync"
    mkdir -p "$target" && mount -t ext4 -o "$options" "$dev" "$target" || fail "cannot mount volume disk $dev at $target"
done

# Loopback is up on every machine, NIC or not: servers in the sandbox bind 127.0.0.1 (docs/ports.md).
ip link set lo up

# Allowlisted machines have a NIC and get its address on the command line (dsec/substrates/vm/net.py).
guest_ip=""
guest_gw=""
for word in $(cat /proc/cmdline); do
    case "$word" in
    dsec.ip=*) guest_ip="${word#dsec.ip=}" ;;
    dsec.gw=*) guest_gw="${word#dsec.gw=}" ;;
    esac
done
if [ -n "$guest_ip" ]; then
    tries=0
    while [ ! -e /sys/class/net/eth0 ]; do
        tries=$((tries + 1))
        [ $tries -gt 500 ] && fail "no network device eth0"
        usleep 10000
    done
    ip addr add "$guest_ip" dev eth0 && ip link set eth0 up && ip route add default via "$guest_gw" \
        || fail "cannot configure eth0 as $guest_ip via $guest_gw"
fi

port=""
tries=0
while [ -z "$port" ]; do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = dsec.agent ] && port="/dev/${p##*/}"
    done
    tries=$((tries + 1))
    [ -z "$port" ] && [ $tries -gt 500 ] && fail "no virtio-serial port named dsec.agent"
    [ -z "$port" ] && usleep 10000
done

for d in proc sys dev tmp .dsec; do
    mkdir -p "/newroot/$d"
done
mount -t tmpfs -o mode=0755,size=16m dsec /newroot/.dsec
cp /dsec-agent /newroot/.dsec/dsec-agent
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
chmod 1777 /newroot/tmp
hostname dsec
exec switch_root /newroot /.dsec/dsec-agent --device "$port"
