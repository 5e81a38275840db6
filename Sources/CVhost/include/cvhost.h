#ifndef CVHOST_H
#define CVHOST_H
// vhost ioctl request numbers as typed constants (Swift cannot import the _IO* macros), plus
// the structs from <linux/vhost.h> and <linux/vm_sockets.h>. Nothing else lives here.
#include <linux/vhost.h>
#include <linux/vm_sockets.h>
#include <sys/ioctl.h>
#include <stdint.h>
#include <stddef.h>

static const unsigned long CVHOST_GET_FEATURES = VHOST_GET_FEATURES;
static const unsigned long CVHOST_SET_FEATURES = VHOST_SET_FEATURES;
static const unsigned long CVHOST_SET_OWNER = VHOST_SET_OWNER;
static const unsigned long CVHOST_RESET_OWNER = VHOST_RESET_OWNER;
static const unsigned long CVHOST_SET_MEM_TABLE = VHOST_SET_MEM_TABLE;
static const unsigned long CVHOST_SET_VRING_NUM = VHOST_SET_VRING_NUM;
static const unsigned long CVHOST_SET_VRING_ADDR = VHOST_SET_VRING_ADDR;
static const unsigned long CVHOST_SET_VRING_BASE = VHOST_SET_VRING_BASE;
static const unsigned long CVHOST_GET_VRING_BASE = VHOST_GET_VRING_BASE;
static const unsigned long CVHOST_SET_VRING_KICK = VHOST_SET_VRING_KICK;
static const unsigned long CVHOST_SET_VRING_CALL = VHOST_SET_VRING_CALL;
static const unsigned long CVHOST_VSOCK_SET_GUEST_CID = VHOST_VSOCK_SET_GUEST_CID;
static const unsigned long CVHOST_VSOCK_SET_RUNNING = VHOST_VSOCK_SET_RUNNING;

static const unsigned long CVHOST_MEMORY_REGIONS_OFFSET = offsetof(struct vhost_memory, regions);
static const unsigned int CVHOST_AF_VSOCK = AF_VSOCK;

#endif
