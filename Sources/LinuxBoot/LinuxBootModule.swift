/// LinuxBoot module (in progress).
public enum LinuxBootModule {}
