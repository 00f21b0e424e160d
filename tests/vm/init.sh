#!/bin/busybox sh
# /init of the test bed's initramfs.  Kernel command line switches:
#   bed.port=N   control channel port (default 7070)
#   bed.shell=1  run an interactive shell on the console (try-it mode)
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
mkdir -p /proc /sys /dev /tmp /run /root /var/log
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mkdir -p /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ln -sf /proc/self/fd /dev/fd 2>/dev/null

port=7070
shell=0
for a in $(cat /proc/cmdline); do
    case "$a" in
    bed.port=*) port=${a#bed.port=} ;;
    bed.shell=*) shell=${a#bed.shell=} ;;
    esac
done

# Load the network modules; dependencies are resolved by retrying.
for round in 1 2 3 4 5 6; do
    missing=0
    for m in /lib/modules/bed/*.ko; do
        [ -e "$m" ] || continue
        name=$(basename "$m" .ko)
        mod=$(echo "$name" | tr - _)
        grep -q "^$mod " /proc/modules && continue
        insmod "$m" 2>/dev/null || missing=1
    done
    [ $missing = 0 ] && break
done
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done

hostname sockscope-vm
echo "127.0.0.1 localhost sockscope-vm" >/etc/hosts
echo "::1 localhost ip6-localhost" >>/etc/hosts
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad
ip -6 addr add fd00:5c0:5c0::15/64 dev eth0
: >/etc/resolv.conf

echo "bed: kernel $(uname -r) modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
ip addr | grep -E "^[0-9]|inet"
nc -ll -p "$port" -e /bin/sh /bed/agent.sh &
echo "SOCKSCOPE-BED-READY port=$port uptime=$(cut -d' ' -f1 /proc/uptime)"

if [ "$shell" = 1 ]; then
    while :; do setsid cttyhack sh -l; sleep 1; done
fi
while :; do sleep 3600; done
