/* REFRESH (docs/agent-protocol.md, "REFRESH"): give a guest restored from a snapshot its own identity before
 * anything runs in it. Clones of one snapshot share the clock stopped at snapshot time and the kernel's CRNG
 * state; Linux 6.1 (drivers/char/random.c) reseeds the CRNG from its input pool only every
 * CRNG_RESEED_INTERVAL, so until then every clone's /dev/urandom would give the same bytes. So, in this order
 * (the reseed first: a clock that cannot be set must not leave a clone with its siblings' CRNG):
 *   ENTROPY: RNDADDENTROPY mixes the host's bytes into the input pool and credits them (write_pool_user,
 *            credit_init_bits), then RNDRESEEDCRNG extracts a new base key from that pool at once (crng_reseed,
 *            which also bumps base_crng.generation so every per-CPU CRNG rekeys on its next use); both ioctls
 *            need CAP_SYS_ADMIN (random_ioctl);
 *   TIME_NS: clock_settime(CLOCK_REALTIME) (needs CAP_SYS_TIME);
 *   MAC:     the interface whose address is the snapshot's MAC gets the clone's (SIOCSIFHWADDR, CAP_NET_ADMIN).
 *            Linux's virtio_net read the MAC from the device's config space at probe time and keeps it in the
 *            net_device, so the clone's device reporting a new one changes nothing in the guest until it is set
 *            here. virtio_net allows a live change (IFF_LIVE_ADDR_CHANGE); arp_notify is switched on around
 *            it so that the kernel announces the new address with a gratuitous ARP (NETDEV_CHANGEADDR,
 *            net/ipv4/devinet.c), and neighbours on a shared bridge learn it at once.
 * The agent runs as root in the guest.
 * Each step that fails is answered with ERROR OS naming it; the steps before it stay done. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <linux/random.h>

#include "agent.h"

/* struct rand_pool_info ends in a flexible array: this gives it room for the largest ENTROPY (a fixed size,
 * not the guest-controlled one) */
union pool {
	struct rand_pool_info info;
	unsigned char bytes[sizeof(struct rand_pool_info) + PA_MAX_ENTROPY];
};

static void step_failed(struct conn *c, int err, const char *step)
{
	conn_send_error(c, PA_ERR_OS, err, "REFRESH: cannot %s: %s", step, strerror(err));
	conn_finish(c);
}

/* write value to /proc/sys/net/ipv4/conf/IF/arp_notify, returning the old one in old (or -1 where the file
 * cannot be read: IPv4 is off for the interface, or /proc is not mounted; the change itself does not need it) */
static int set_arp_notify(const char *ifname, char value, char *old)
{
	char path[96];
	snprintf(path, sizeof(path), "/proc/sys/net/ipv4/conf/%s/arp_notify", ifname);
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -1;
	if (old && read(fd, old, 1) != 1)
		*old = '0';
	int ok = pwrite(fd, &value, 1, 0) == 1;
	close(fd);
	return ok ? 0 : -1;
}

/* 0, or the errno of the step that failed, named in step: ENODEV when no interface has the old address */
static int change_mac(const unsigned char *old_mac, const unsigned char *new_mac, const char **step)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		*step = "open a socket to change the MAC";
		return errno;
	}
	struct if_nameindex *names = if_nameindex();
	if (!names) {
		int err = errno;
		close(s);
		*step = "list the network interfaces";
		return err;
	}
	int err = ENODEV;
	*step = "find the interface with the snapshot's MAC";
	for (struct if_nameindex *n = names; n->if_index != 0; n++) {
		struct ifreq ifr;
		memset(&ifr, 0, sizeof(ifr));
		snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", n->if_name);
		if (ioctl(s, SIOCGIFHWADDR, &ifr) < 0 || memcmp(ifr.ifr_hwaddr.sa_data, old_mac, 6) != 0)
			continue;
		char notify = '0';
		int notified = set_arp_notify(n->if_name, '1', &notify) == 0;
		memcpy(ifr.ifr_hwaddr.sa_data, new_mac, 6); /* sa_family stays the one SIOCGIFHWADDR gave (ARPHRD_ETHER) */
		err = ioctl(s, SIOCSIFHWADDR, &ifr) < 0 ? errno : 0;
		*step = "set the interface's MAC (ioctl SIOCSIFHWADDR)";
		if (notified)
			set_arp_notify(n->if_name, notify, NULL);
		break;
	}
	if_freenameindex(names);
	close(s);
	return err;
}

void handle_refresh(struct conn *c, const struct request *r)
{
	if (r->has_entropy) {
		if (r->entropy.n < 1 || r->entropy.n > PA_MAX_ENTROPY) { /* parse_request checked it; kept local */
			step_failed(c, EINVAL, "add entropy of this size");
			return;
		}
		static union pool pool; /* static: no 500-byte stack frame, one connection per process */
		memset(&pool, 0, sizeof(pool));
		pool.info.entropy_count = (int)(r->entropy.n * 8);
		pool.info.buf_size = (int)r->entropy.n;
		memcpy(pool.bytes + offsetof(struct rand_pool_info, buf), r->entropy.p, r->entropy.n);
		int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC | O_NOCTTY);
		if (fd < 0) {
			step_failed(c, errno, "open /dev/urandom");
			return;
		}
		int failed = ioctl(fd, RNDADDENTROPY, &pool.info) < 0;
		int err = errno;
		explicit_bzero(&pool, sizeof(pool)); /* the seed is the guest kernel's now, not this process's */
		if (failed) {
			close(fd);
			step_failed(c, err, "add entropy to the input pool (ioctl RNDADDENTROPY)");
			return;
		}
		if (ioctl(fd, RNDRESEEDCRNG) < 0) {
			err = errno;
			close(fd);
			step_failed(c, err, "reseed the CRNG (ioctl RNDRESEEDCRNG)");
			return;
		}
		close(fd);
	}
	if (r->has_time_ns) {
		struct timespec ts = {
			.tv_sec = (time_t)(r->time_ns / 1000000000u),
			.tv_nsec = (long)(r->time_ns % 1000000000u),
		};
		if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
			step_failed(c, errno, "set CLOCK_REALTIME (clock_settime)");
			return;
		}
	}
	if (r->has_mac) {
		const char *step = "";
		int err = change_mac(r->mac_old, r->mac_new, &step);
		if (err) {
			step_failed(c, err, step);
			return;
		}
	}
	if (conn_send(c, PA_OK, NULL, 0, PA_IO_IDLE_MS) == 0)
		conn_finish(c);
}
