/// Bench module (in progress).
public enum BenchModule {}
