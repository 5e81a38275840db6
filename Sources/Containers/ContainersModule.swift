/// Containers module (in progress).
public enum ContainersModule {}
