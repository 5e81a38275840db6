#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

/* libvirt's default authentication callbacks (terminal prompts), read through a function so
   Swift does not see a mutable global. */
static inline virConnectAuthPtr mvm_default_auth(void) { return virConnectAuthPtrDefault; }
