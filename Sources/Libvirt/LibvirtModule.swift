/// Libvirt module (in progress).
public enum LibvirtModule {}
