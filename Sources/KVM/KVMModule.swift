/// KVM module (in progress).
public enum KVMModule {}
