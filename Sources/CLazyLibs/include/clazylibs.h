/* libvirt and libguestfs are loaded on first use, not at start: together they pull in some 55
   shared libraries (GnuTLS, curl, GLib, Kerberos…) whose loading cost every `mvm` command about
   20 ms, though only hosted mode and image inspection call them. lazy.c defines each function
   the project calls as a trampoline that loads the library, resolves the real function once and
   jumps to it with the caller's arguments untouched. */
#ifndef CLAZYLIBS_H
#define CLAZYLIBS_H

/* libvirt's default authentication callbacks (a data symbol, read through the loaded library). */
void *mvm_lazy_libvirt_default_auth(void);

/* Whether the library can be loaded (0: libvirt, 1: libguestfs), without aborting. */
int mvm_lazy_available(int lib);

/* Whether the library is installed, found by its file where Debian puts it (no loading); asks
   the dynamic linker when it is not there. */
int mvm_lazy_installed(int lib);

#endif
