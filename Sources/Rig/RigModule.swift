/// Rig module (in progress).
public enum RigModule {}
