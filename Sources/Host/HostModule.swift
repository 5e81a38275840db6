/// Host module (in progress).
public enum HostModule {}
