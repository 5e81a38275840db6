/// Allocator module (in progress).
public enum AllocatorModule {}
