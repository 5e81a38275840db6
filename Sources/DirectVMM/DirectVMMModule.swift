/// DirectVMM module (in progress).
public enum DirectVMMModule {}
