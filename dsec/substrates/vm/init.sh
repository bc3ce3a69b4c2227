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

tries=0
while [ ! -b /dev/vda ]; do
    tries=$((tries + 1))
    [ $tries -gt 500 ] && fail "no root disk /dev/vda"
    usleep 10000
done
mount -t ext4 -o noatime /dev/vda /newroot || fail "cannot mount /dev/vda"

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
