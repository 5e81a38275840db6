/// Images module (in progress).
public enum ImagesModule {}
